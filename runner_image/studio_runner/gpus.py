"""The NVIDIA cards this runner may hand to experiments, read through NVML.

Only ``_read_nvml`` talks to the driver; slot rules and visibility work on plain ``Gpu``
values, so they are tested on machines without a GPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import pynvml

from .units import format_size

log = logging.getLogger(__name__)

GIB = 1024**3

_logged: set[tuple[object, ...]] = set()


def _log_once(level: int, message: str, *args: object) -> None:
    """``inventory`` runs again every ~30 s to watch ECC counts; each finding is worth saying once."""
    key = (message, *args)
    if key not in _logged:
        _logged.add(key)
        log.log(level, message, *args)


SLOT_TABLE: tuple[tuple[str, int], ...] = (
    ("GTX 1050", 2),
    ("GTX 1060", 2),
    ("GTX 1070", 2),
    ("GTX 1080", 2),
    ("TITAN X", 2),
    ("RTX 2080 Ti", 2),
    ("Tesla K80", 2),
    ("NVIDIA K80", 2),
    ("Tesla P40", 4),
    ("NVIDIA P40", 4),
    ("Tesla P100", 8),
    ("NVIDIA P100", 8),
    ("Tesla V100", 16),
    ("NVIDIA V100", 16),
    ("A100-SXM4-40GB", 24),
)
"""Upstream's slots per model, matched as substrings of the NVML name (spec §4.6)."""

NO_DEVICES = frozenset({"-1", "none", "void"})
"""Visibility values meaning "no GPU": CUDA's ``-1`` and the NVIDIA container runtime's words."""


@dataclass(frozen=True)
class Gpu:
    """One card as NVML reported it; ``slots`` is how big a request (``gpus``) it can take."""

    index: int
    uuid: str
    name: str
    slots: int
    memory_total: int
    memory_free: int
    ecc_errors: int = 0

    @property
    def fenced(self) -> bool:
        """Uncorrected ECC errors make a card's results untrustworthy; upstream fenced it for good."""
        return self.ecc_errors > 0

    @property
    def usable(self) -> bool:
        return self.slots > 0 and not self.fenced

    def __str__(self) -> str:
        return f"GPU {self.index} {self.name} ({self.slots} slots, {format_size(self.memory_free)} free)"


def slots_for(name: str, memory_total: int, overrides: Mapping[str, int] | None = None) -> int:
    """A card's slots: a ``--gpu-slots`` override, else the upstream table, else one per GiB.

    Upstream gave models outside its table 0 slots, so no card newer than the A100-40GB (A10G,
    L4, L40S, A100-80GB, H100, H200) could ever run GPU work. One slot per GiB of memory
    (rounded) matches the table where it was calibrated (V100 16 GB = 16 slots), never leaves a
    card unusable, and grows with the card, so "fewest slots first" keeps big cards for big jobs
    and a request sized for a listed card lands on an unlisted one with about as much memory.
    """
    listed = _listed_slots(name, overrides)
    return listed if listed is not None else _slots_from_memory(memory_total)


def _listed_slots(name: str, overrides: Mapping[str, int] | None) -> int | None:
    """Overrides first (the longest matching model wins), then the table; None when unlisted."""
    lowered = name.lower()
    matches = [
        (len(model), slots)
        for model, slots in (overrides or {}).items()
        if model and model.lower() in lowered
    ]
    if matches:
        return max(matches)[1]
    for pattern, slots in SLOT_TABLE:
        if pattern.lower() in lowered:
            return slots
    return None


def _slots_from_memory(memory_total: int) -> int:
    return int(memory_total / GIB + 0.5)


def parse_slot_overrides(items: Iterable[str]) -> dict[str, int]:
    """``MODEL=N`` items from ``--gpu-slots``; the model is matched as part of the NVML name."""
    overrides: dict[str, int] = {}
    for item in items:
        model, separator, count = item.rpartition("=")
        model, count = model.strip(), count.strip()
        if not separator or not model or not count.isdigit():
            raise ValueError(
                f"--gpu-slots {item!r} is not MODEL=N (for example 'NVIDIA A10G=24'; 0 disables a model)"
            )
        overrides[model] = int(count)
    return overrides


def visible_devices_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The runner's own visibility setting: ``CUDA_VISIBLE_DEVICES``, else ``NVIDIA_VISIBLE_DEVICES``, as upstream."""
    env = os.environ if environ is None else environ
    return env.get("CUDA_VISIBLE_DEVICES") or env.get("NVIDIA_VISIBLE_DEVICES") or None


def filter_visible(devices: Sequence[Gpu], visible: str | None) -> list[Gpu]:
    """The cards a visibility value names, in its order.

    Empty or ``all`` means every card; ``-1``/``none``/``void`` none. Entries are UUIDs
    (``nvidia-smi -L``) or, with a warning, NVML indexes; like CUDA, an entry that names no
    card ends the list, so a typo hides cards rather than exposing ones that were meant to be hidden.
    """
    text = (visible or "").strip()
    if not text or text.lower() == "all":
        return list(devices)
    if text.lower() in NO_DEVICES:
        return []
    by_uuid = {device.uuid.lower(): device for device in devices}
    by_index = {device.index: device for device in devices}
    chosen: list[Gpu] = []
    warned = False
    for token in (part.strip() for part in text.split(",")):
        device = by_uuid.get(token.lower())
        if device is None and token.lstrip("-").isdigit():
            if not warned:
                warned = True
                _log_once(
                    logging.WARNING,
                    "visible devices %r uses GPU indexes, which change with drivers and containers; list UUIDs instead (nvidia-smi -L)",
                    text,
                )
            device = by_index.get(int(token))
        if device is None:
            _log_once(
                logging.WARNING,
                "visible devices %r: %r names no GPU that NVML lists; it and the entries after it are ignored",
                text,
                token,
            )
            break
        if device not in chosen:
            chosen.append(device)
    return chosen


def inventory(visible: str | None = None, slot_overrides: Mapping[str, int] | None = None) -> list[Gpu]:
    """The cards this runner may use, with their slots; empty, with one log line, when NVML cannot start."""
    try:
        devices = _read_nvml()
    except pynvml.NVMLError as error:
        log.warning(
            "no NVIDIA GPU can be used: NVML did not start (%s); install the NVIDIA driver or run with --cpu-only",
            error,
        )
        return []
    cards = []
    for device in filter_visible(devices, visible):
        card = replace(device, slots=slots_for(device.name, device.memory_total, slot_overrides))
        if _listed_slots(card.name, slot_overrides) is None:
            _log_once(
                logging.INFO,
                "GPU %d %s is not in the slot table; it gets %d slots, one per GiB of memory (change with --gpu-slots '%s=N')",
                card.index,
                card.name,
                card.slots,
                card.name,
            )
        if card.fenced:
            _log_once(
                logging.WARNING,
                "GPU %d %s (%s) has %d uncorrected ECC errors and will not be used",
                card.index,
                card.name,
                card.uuid,
                card.ecc_errors,
            )
        cards.append(card)
    return cards


def _read_nvml() -> list[Gpu]:
    """Every card the driver lists, ``slots`` left at 0 for ``inventory``; NVMLError when NVML cannot start."""
    pynvml.nvmlInit()
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                try:
                    ecc_errors = pynvml.nvmlDeviceGetTotalEccErrors(
                        handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
                    )
                except pynvml.NVMLError_NotSupported:
                    ecc_errors = 0
                devices.append(
                    Gpu(
                        index=index,
                        uuid=pynvml.nvmlDeviceGetUUID(handle),
                        name=pynvml.nvmlDeviceGetName(handle),
                        slots=0,
                        memory_total=int(memory.total),
                        memory_free=int(memory.free),
                        ecc_errors=int(ecc_errors),
                    )
                )
            except pynvml.NVMLError as error:
                _log_once(logging.WARNING, "GPU %d skipped: NVML could not read it (%s)", index, str(error))
        return devices
    finally:
        pynvml.nvmlShutdown()
