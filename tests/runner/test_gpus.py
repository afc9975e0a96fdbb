from __future__ import annotations

import logging
from pathlib import Path

import pynvml
import pytest
from studio_runner import gpus
from studio_runner.gpus import (
    GIB,
    Gpu,
    filter_visible,
    inventory,
    parse_slot_overrides,
    slots_for,
    visible_devices_from_env,
)
from studio_runner.jobenv import job_environment
from studio_runner.layout import ExperimentLayout
from studio_runner.pythonenv import Virtualenv
from studio_runner.request import decode_request
from studio_runner.resources import HostCapacity, ResourcePool, ResourceUnavailable

MIB = 1024**2


def device(index: int, name: str = "NVIDIA A10G", memory: int = 23028 * MIB, ecc: int = 0) -> Gpu:
    """A card as ``_read_nvml`` returns it: slots not yet assigned."""
    return Gpu(
        index=index,
        uuid=f"GPU-{index:08x}-1111-2222-3333-444455556666",
        name=name,
        slots=0,
        memory_total=memory,
        memory_free=memory - 500 * MIB,
        ecc_errors=ecc,
    )


@pytest.mark.parametrize(
    ("name", "slots"),
    [
        ("GeForce GTX 1050 Ti", 2),
        ("GeForce GTX 1060 6GB", 2),
        ("GeForce GTX 1070", 2),
        ("GeForce GTX 1080 Ti", 2),
        ("TITAN X (Pascal)", 2),
        ("NVIDIA GeForce RTX 2080 Ti", 2),
        ("Tesla K80", 2),
        ("NVIDIA K80", 2),
        ("Tesla P40", 4),
        ("Tesla P100-PCIE-16GB", 8),
        ("Tesla V100-SXM2-16GB", 16),
        ("Tesla V100-PCIE-32GB", 16),
        ("NVIDIA A100-SXM4-40GB", 24),
    ],
)
def test_upstream_table_wins_over_memory(name: str, slots: int) -> None:
    assert slots_for(name, 80 * GIB) == slots


@pytest.mark.parametrize(
    ("name", "mib", "slots"),
    [
        ("NVIDIA A10G", 23028, 22),
        ("NVIDIA L4", 23034, 22),
        ("NVIDIA L40S", 46068, 45),
        ("NVIDIA A100-SXM4-80GB", 81920, 80),
        ("NVIDIA H100 80GB HBM3", 81559, 80),
        ("NVIDIA H200", 143771, 140),
        ("Tesla T4", 15360, 15),
        ("Quadro P400", 2000, 2),
    ],
)
def test_unknown_cards_get_one_slot_per_gib(name: str, mib: int, slots: int) -> None:
    assert slots_for(name, mib * MIB) == slots


def test_overrides_beat_the_table_and_the_longest_model_wins() -> None:
    overrides = {"a100": 30, "A100-SXM4-80GB": 48, "Tesla V100": 12, "L4": 0}
    assert slots_for("NVIDIA A100-SXM4-80GB", 80 * GIB, overrides) == 48
    assert slots_for("NVIDIA A100-PCIE-40GB", 40 * GIB, overrides) == 30
    assert slots_for("Tesla V100-SXM2-16GB", 16 * GIB, overrides) == 12
    assert slots_for("NVIDIA L4", 22 * GIB, overrides) == 0
    assert slots_for("NVIDIA H100 80GB HBM3", 80 * GIB, overrides) == 80


def test_slot_overrides_parse_from_the_command_line() -> None:
    assert parse_slot_overrides(["NVIDIA A10G=24", " H100 = 64 ", "L4=0"]) == {
        "NVIDIA A10G": 24,
        "H100": 64,
        "L4": 0,
    }
    for bad in ("A10G", "=4", "A10G=-1", "A10G=many", "A10G="):
        with pytest.raises(ValueError, match="MODEL=N"):
            parse_slot_overrides([bad])


CARDS = [device(0), device(1), device(2)]


@pytest.mark.parametrize("visible", [None, "", "  ", "all", "ALL"])
def test_visibility_all(visible: str | None) -> None:
    assert filter_visible(CARDS, visible) == CARDS


@pytest.mark.parametrize("visible", ["-1", "none", "void", "NoNe"])
def test_visibility_none(visible: str) -> None:
    assert filter_visible(CARDS, visible) == []


def test_visibility_by_uuid_keeps_the_given_order(caplog: pytest.LogCaptureFixture) -> None:
    visible = f"{CARDS[2].uuid}, {CARDS[0].uuid.upper()}"
    with caplog.at_level(logging.WARNING):
        assert filter_visible(CARDS, visible) == [CARDS[2], CARDS[0]]
    assert not caplog.records


def test_visibility_by_index_works_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert filter_visible(CARDS, f"1,{CARDS[2].uuid},0,1") == [CARDS[1], CARDS[2], CARDS[0]]
    assert len(caplog.records) == 1
    assert "UUIDs" in caplog.text


def test_visibility_stops_at_an_entry_naming_no_card_as_cuda_does(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert filter_visible(CARDS, f"{CARDS[1].uuid},GPU-typo,{CARDS[0].uuid}") == [CARDS[1]]
    assert "GPU-typo" in caplog.text
    assert filter_visible(CARDS, "0,7,1") == [CARDS[0]]
    assert filter_visible(CARDS, "-1,0") == []


def test_visible_devices_come_from_cuda_then_nvidia_variable() -> None:
    assert (
        visible_devices_from_env({"CUDA_VISIBLE_DEVICES": "GPU-a", "NVIDIA_VISIBLE_DEVICES": "all"})
        == "GPU-a"
    )
    assert (
        visible_devices_from_env({"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "GPU-b"}) == "GPU-b"
    )
    assert visible_devices_from_env({}) is None


def test_inventory_assigns_slots_and_applies_visibility(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    raw = [
        device(0, "Tesla V100-SXM2-16GB", 16160 * MIB),
        device(1, "NVIDIA B200", 183359 * MIB),
        device(2, "NVIDIA A10G", 23028 * MIB, ecc=3),
    ]
    monkeypatch.setattr(gpus, "_read_nvml", lambda: raw)
    with caplog.at_level(logging.INFO, logger="studio_runner.gpus"):
        cards = inventory(f"{raw[2].uuid},{raw[1].uuid},{raw[0].uuid}", {"A10G": 24})
    assert [(card.index, card.slots) for card in cards] == [(2, 24), (1, 179), (0, 16)]
    assert [card.usable for card in cards] == [False, True, True]
    assert "NVIDIA B200 is not in the slot table; it gets 179 slots" in caplog.text
    assert "--gpu-slots 'NVIDIA B200=N'" in caplog.text
    assert "has 3 uncorrected ECC errors" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="studio_runner.gpus"):
        assert inventory(f"{raw[2].uuid},{raw[1].uuid},{raw[0].uuid}", {"A10G": 24}) == cards
    assert not caplog.records  # the periodic re-inventory repeats no finding
    assert inventory("none") == []


def test_inventory_without_nvml_is_empty_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_library() -> list[Gpu]:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(gpus, "_read_nvml", no_library)
    with caplog.at_level(logging.WARNING):
        assert inventory() == []
    assert len(caplog.records) == 1
    assert "--cpu-only" in caplog.text


def test_inventory_on_this_machine(caplog: pytest.LogCaptureFixture) -> None:
    """The real NVML path: no GPU here gives [] and one log line; on a GPU machine, real cards."""
    with caplog.at_level(logging.WARNING, logger="studio_runner.gpus"):
        cards = inventory()
    if cards:
        assert all(
            card.uuid.startswith(("GPU-", "MIG-")) and card.memory_total > 0 and card.slots > 0
            for card in cards
        )
        assert len({card.uuid for card in cards}) == len(cards)
    else:
        assert "NVML did not start" in caplog.text
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlShutdown()  # inventory() left NVML shut down


def test_a_two_card_request_gets_two_cards_and_its_workload_sees_both(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ENN DAG's ``gpus_per_experiment: 2`` as the runner receives it (rendered templates are
    strings): NVML's cards through the seam, two whole cards per experiment, both UUIDs exported."""
    raw = [device(index) for index in range(5)]
    monkeypatch.setattr(gpus, "_read_nvml", lambda: raw)
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    request = decode_request(
        {
            "experiment": {
                "key": "enn-gen000-g000",
                "filename": "train_genome.py",
                "resources_needed": {"cpus": 1, "ram": "1g", "hdd": "2g", "gpuCount": "2", "gpus": "1"},
            }
        }
    )
    pool = ResourcePool.from_host(
        working_dir=tmp_path, host=HostCapacity(cores=8, ram=64 * GIB, disk_free=500 * GIB)
    )
    assert len(pool.gpus) == 5

    first = pool.allocate(request.experiment.resources_needed)
    second = pool.allocate(request.experiment.resources_needed)
    assert [len(first.gpus), len(second.gpus)] == [2, 2]
    assert not {card.uuid for card in first.gpus} & {card.uuid for card in second.gpus}, (
        "cards are never shared"
    )
    with pytest.raises(ResourceUnavailable) as refused:
        pool.allocate(request.experiment.resources_needed)  # one card left: the request waits
    assert not refused.value.permanent

    uuids = ",".join(card.uuid for card in first.gpus)
    assert first.env()["CUDA_VISIBLE_DEVICES"] == first.env()["NVIDIA_VISIBLE_DEVICES"] == uuids
    venv_path = tmp_path / "venv"
    workload = job_environment(
        request,
        ExperimentLayout.create(tmp_path / "experiments", request.key),
        venv=Virtualenv(
            path=venv_path, python=venv_path / "bin" / "python", key="k", built=False, seconds=0.0
        ),
        allocation_env=first.env(),
        base_env={"PATH": "/usr/bin:/bin"},
    )
    assert workload["CUDA_VISIBLE_DEVICES"] == workload["NVIDIA_VISIBLE_DEVICES"] == uuids
    assert len(workload["CUDA_VISIBLE_DEVICES"].split(",")) == 2

    first.release()
    assert pool.snapshot().gpu_cards_free == 3
