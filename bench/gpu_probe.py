"""Print this machine's GPU inventory and one sample allocation as JSON.

For checking the real NVML path on a GPU machine:
``.venv/bin/python bench/gpu_probe.py [--gpu-slots 'NVIDIA H100=64'] [--visible GPU-…]``.
Log lines (why a card has its slots, why NVML did not start) go to stderr. Without a usable GPU
it says so (``"gpus": []``, ``"note"``), shows a CPU-only allocation and still exits 0: that is
a result, not an error. With two or more cards the sample asks for two, as ``gpuCount: 2`` does.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import pynvml
from studio_runner.gpus import inventory, parse_slot_overrides, visible_devices_from_env
from studio_runner.request import Resources
from studio_runner.resources import ResourcePool, ResourceUnavailable


def _driver() -> str:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        return f"unavailable: {error}"
    try:
        return f"{pynvml.nvmlSystemGetDriverVersion()} (NVML {pynvml.nvmlSystemGetNVMLVersion()})"
    finally:
        pynvml.nvmlShutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-slots", action="append", default=[], metavar="MODEL=N")
    parser.add_argument(
        "--visible", default=None, help="default: CUDA_VISIBLE_DEVICES, else NVIDIA_VISIBLE_DEVICES"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    visible = args.visible if args.visible is not None else visible_devices_from_env()
    cards = inventory(visible, parse_slot_overrides(args.gpu_slots))
    usable = [card for card in cards if card.usable]
    report: dict[str, object] = {
        "driver": _driver(),
        "visible": visible,
        "gpus": [asdict(card) for card in cards],
    }
    if not usable:
        report["note"] = "no usable NVIDIA GPU here (see the log line on stderr): the sample is CPU only"

    with tempfile.TemporaryDirectory() as working_dir:
        pool = ResourcePool.from_host(working_dir=Path(working_dir), cpu_only=not usable, gpus=cards)
        report["pool"] = asdict(pool.snapshot())
        smallest = min((card.slots for card in usable), default=0)
        cores = min(2, pool.snapshot().cores_total)
        request = Resources(
            cpus=cores,
            ram="1GiB",
            hdd="1GiB",
            gpus=smallest,
            gpu_count=min(2, len(usable)),
            gpu_mem="1GiB" if usable else "",
        )
        with pool.allocate(request) as allocation:
            report["sample_request"] = request.model_dump(mode="json")
            report["sample_allocation"] = {
                "cores": allocation.cores,
                "ram": allocation.ram,
                "disk": allocation.disk,
                "gpus": [card.uuid for card in allocation.gpus],
                "env": allocation.env(),
                "pool_while_held": asdict(pool.snapshot()),
            }
        try:
            pool.check(Resources(gpus=max(smallest, 1), gpu_count=len(usable) + 1))
        except ResourceUnavailable as refusal:
            report["sample_refusal"] = {"message": str(refusal), "permanent": refusal.permanent}
    print(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
