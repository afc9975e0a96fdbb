"""CPU, RAM, disk and GPU accounting for the experiments one runner runs at once.

As upstream, a reservation is a promise against limits fixed at start-up, not a measurement:
the runner keeps it by refusing work that would overcommit the machine.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

from .gpus import Gpu, inventory, visible_devices_from_env
from .request import Resources
from .units import format_size

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_MEMBERSHIP = Path("/proc/self/cgroup")
DISK_SHARE = 0.85
"""Share of the working directory's free space offered when ``--max-disk`` is 0 (upstream rule)."""
_NO_MEMORY_LIMIT = 1 << 60
"""cgroup v1 writes "unlimited" as a page-rounded 2**63; anything this large is no limit."""


class ResourceUnavailable(Exception):
    """A request does not fit; ``permanent`` when it never can on this runner, so it must not be retried here."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class CgroupLimits:
    cpus: float | None = None
    memory: int | None = None


@dataclass(frozen=True)
class HostCapacity:
    """What this process may use: cores, RAM, and free bytes in the working directory."""

    cores: int
    ram: int
    disk_free: int


@dataclass(frozen=True)
class PoolSnapshot:
    """Free and total figures, for metrics and the queue capacity check (spec §2.5, §4.6)."""

    cores_free: int
    cores_total: int
    ram_free: int
    ram_total: int
    disk_free: int
    disk_total: int
    gpu_slots_free: int
    gpu_slots_total: int
    gpu_cards_free: int
    gpu_cards_total: int
    gpu_mem_free_max: int


def cgroup_limits(root: Path = CGROUP_ROOT, membership: Path = CGROUP_MEMBERSHIP) -> CgroupLimits:
    """The CPU quota (in cores) and memory limit applying to this process; None where unset.

    A container sees its own cgroup at ``root``; a service on a host sits deeper, at the path
    ``membership`` names. Limits on any ancestor apply too, so the tightest along the way wins.
    """
    paths = _memberships(membership)
    if (root / "cgroup.controllers").exists():
        lineage = _lineage(root, paths.get("", "/"))
        return CgroupLimits(
            cpus=_tightest(_v2_cpus(directory) for directory in lineage),
            memory=_tightest(_read_int(directory / "memory.max") for directory in lineage),
        )
    return CgroupLimits(
        cpus=_tightest(_v1_cpus(directory) for directory in _lineage(root / "cpu", paths.get("cpu", "/"))),
        memory=_tightest(
            _read_int(directory / "memory.limit_in_bytes")
            for directory in _lineage(root / "memory", paths.get("memory", "/"))
        ),
    )


def _memberships(membership: Path) -> dict[str, str]:
    """Controller → cgroup path from ``/proc/self/cgroup``; the v2 hierarchy is the controller ``""``."""
    paths: dict[str, str] = {}
    text = _read(membership) or ""
    for line in text.splitlines():
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _lineage(base: Path, path: str) -> list[Path]:
    """This process's cgroup folder and its ancestors up to ``base``; just ``base`` when the path is not mounted there."""
    own = base.joinpath(*[part for part in path.split("/") if part and part != ".."])
    if not own.is_dir():
        return [base]
    lineage = [own]
    while lineage[-1] != base:
        lineage.append(lineage[-1].parent)
    return lineage


def _v2_cpus(directory: Path) -> float | None:
    """``cpu.max`` holds "quota period" in microseconds, or "max period" for no quota."""
    quota, _, period = (_read(directory / "cpu.max") or "max").partition(" ")
    try:
        return int(quota) / int(period or 100_000)
    except (ValueError, ZeroDivisionError):
        return None


def _v1_cpus(directory: Path) -> float | None:
    quota = _read_int(directory / "cpu.cfs_quota_us")
    period = _read_int(directory / "cpu.cfs_period_us") or 100_000
    return quota / period if quota is not None and quota > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    """An integer file; "max", "-1", absent or unreadable mean no limit."""
    try:
        value = int(_read(path) or "")
    except ValueError:
        return None
    return value if 0 <= value < _NO_MEMORY_LIMIT else None


def _tightest(values: Iterable[float | int | None]) -> float | int | None:
    present = [value for value in values if value is not None]
    return min(present) if present else None


def host_capacity(
    working_dir: Path, *, cgroup_root: Path = CGROUP_ROOT, membership: Path = CGROUP_MEMBERSHIP
) -> HostCapacity:
    """Cores and RAM this process may use (cgroup limits over affinity and physical RAM) and free disk.

    A fractional CPU quota rounds down (at least 1): 1.5 cores cannot run two busy threads.
    """
    limits = cgroup_limits(cgroup_root, membership)
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity else os.cpu_count() or 1
    if limits.cpus is not None:
        cores = min(cores, max(1, math.floor(limits.cpus)))
    ram = psutil.virtual_memory().total
    if limits.memory is not None:
        ram = min(ram, int(limits.memory))
    return HostCapacity(cores=cores, ram=ram, disk_free=shutil.disk_usage(working_dir).free)


def _cards_wanted(resources: Resources) -> int:
    """``gpus == 0`` and no ``gpuMem`` means no GPU even with a ``gpuCount``, as upstream."""
    if resources.gpus == 0 and resources.gpu_mem_bytes == 0:
        return 0
    return resources.cards


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _counter_shortfall(
    what: str, need: int, free: int, total: int, show: Callable[[int], str]
) -> tuple[str, bool] | None:
    if need <= free:
        return None
    if need > total:
        return f"needs {show(need)} {what}; this runner has {show(total)} in all", True
    return f"needs {show(need)} {what}; {show(free)} of {show(total)} free now", False


class Allocation:
    """What one experiment holds; give it back with ``release()`` or by leaving the ``with`` block."""

    def __init__(self, pool: ResourcePool, *, cores: int, ram: int, disk: int, gpus: list[Gpu]) -> None:
        self.cores = cores
        self.ram = ram
        self.disk = disk
        self.gpus = gpus
        self._pool = pool
        self.released = False

    def env(self) -> dict[str, str]:
        """Variables for the job (spec §4.3).

        Thread counts leave one core for the runner's own I/O, as upstream. With no card both
        visibility variables are ``-1``; upstream wrote the quotes into the value (``"-1"``),
        which hid the cards only because CUDA rejects the odd name.
        """
        env: dict[str, str] = {}
        if self.cores > 1:
            threads = str(self.cores - 1)
            env.update(
                OPENMP="True", MKL_NUM_THREADS=threads, GOTO_NUM_THREADS=threads, OMP_NUM_THREADS=threads
            )
        devices = ",".join(card.uuid for card in self.gpus) or "-1"
        env["CUDA_VISIBLE_DEVICES"] = devices
        env["NVIDIA_VISIBLE_DEVICES"] = devices
        return env

    def release(self) -> None:
        """Return everything to the pool; later calls do nothing."""
        self._pool._give_back(self)

    def __enter__(self) -> Allocation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        cards = ",".join(card.uuid for card in self.gpus) or "none"
        return f"Allocation(cores={self.cores}, ram={format_size(self.ram)}, disk={format_size(self.disk)}, gpus={cards})"


class ResourcePool:
    """The runner's cores, RAM, disk and cards; every method is safe to call from any thread.

    Cards are never shared between experiments. A card is eligible when it is free, fenced by
    no ECC error, has ``gpuMem`` free and at least ``gpus`` slots; upstream wanted exactly
    ``gpus`` slots, which strands big cards, so the eligible cards with the fewest slots are
    taken and big cards stay free for big jobs. Empty ``ram``/``hdd`` reserve nothing (upstream
    refused them): the StudioML client always sends both, requests from Airflow may not.
    """

    def __init__(
        self, *, cores: int, ram: int, disk: int, gpus: Iterable[Gpu] = (), cpu_only: bool = False
    ) -> None:
        cards = [] if cpu_only else sorted(gpus, key=lambda card: card.index)
        if len({card.uuid for card in cards}) != len(cards):
            raise ValueError("the GPU list names a card twice")
        self.cpu_only = cpu_only
        self._cores_total, self._ram_total, self._disk_total = cores, ram, disk
        self._cores_free, self._ram_free, self._disk_free = cores, ram, disk
        self._cards = {card.uuid: card for card in cards}
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def from_host(
        cls,
        *,
        max_cores: int = 0,
        max_mem: int = 0,
        max_disk: int = 0,
        working_dir: Path,
        cpu_only: bool = False,
        gpus: list[Gpu] | None = None,
        host: HostCapacity | None = None,
    ) -> ResourcePool:
        """The pool for this machine; 0 limits mean all (disk: 85 % of free space), as upstream.

        ``gpus`` None reads NVML; ``cpu_only`` offers no GPU at all; ``host`` None measures this
        machine. Limits above the hardware, or no usable GPU without ``cpu_only``, are start-up
        errors: a runner that cannot keep its promises should not take work.
        """
        host = host or host_capacity(working_dir)
        for option, limit, available, show in (
            ("--max-cores", max_cores, host.cores, str),
            ("--max-mem", max_mem, host.ram, format_size),
            ("--max-disk", max_disk, host.disk_free, format_size),
        ):
            if limit < 0:
                raise ValueError(f"{option} {limit} is negative; use 0 for all that is available")
            if limit > available:
                raise ValueError(
                    f"{option} {show(limit)} is more than the {show(available)} this runner can use; lower it, or use 0 for all"
                )
        cards: list[Gpu] = []
        if not cpu_only:
            cards = inventory(visible_devices_from_env()) if gpus is None else list(gpus)
            if not any(card.usable for card in cards):
                raise ValueError(
                    "no usable NVIDIA GPU was found (see the log above); start with --cpu-only to run CPU work only"
                )
        pool = cls(
            cores=max_cores or host.cores,
            ram=max_mem or host.ram,
            disk=max_disk or int(host.disk_free * DISK_SHARE),
            gpus=cards,
            cpu_only=cpu_only,
        )
        snapshot = pool.snapshot()
        log.info(
            "resources: %d cores, %s RAM, %s disk in %s, %s",
            snapshot.cores_total,
            format_size(snapshot.ram_total),
            format_size(snapshot.disk_total),
            working_dir,
            "; ".join(str(card) for card in cards) or "no GPU",
        )
        return pool

    @property
    def gpus(self) -> list[Gpu]:
        with self._lock:
            return list(self._cards.values())

    def fits(self, resources: Resources) -> bool:
        """Whether the request could be allocated now (the dry run before taking a message)."""
        with self._lock:
            return not self._evaluate(resources)[1]

    def check(self, resources: Resources) -> None:
        """Raise ResourceUnavailable if the request does not fit now; allocates nothing."""
        with self._lock:
            self._raise_if_short(self._evaluate(resources)[1])

    def allocate(self, resources: Resources) -> Allocation:
        with self._lock:
            cards, shortfalls = self._evaluate(resources)
            self._raise_if_short(shortfalls)
            allocation = Allocation(
                self, cores=resources.cpus, ram=resources.ram_bytes, disk=resources.hdd_bytes, gpus=cards
            )
            self._cores_free -= allocation.cores
            self._ram_free -= allocation.ram
            self._disk_free -= allocation.disk
            self._busy.update(card.uuid for card in cards)
        log.debug("allocated %r", allocation)
        return allocation

    def refresh_gpus(self, gpus: Iterable[Gpu]) -> None:
        """Take fresh free-memory and ECC figures from a new ``inventory()`` (upstream: every ~30 s).

        A card that reports ECC errors stays fenced even if the volatile count later resets.
        """
        with self._lock:
            for fresh in gpus:
                known = self._cards.get(fresh.uuid)
                if known is None:
                    continue
                if fresh.fenced and not known.fenced:
                    log.warning(
                        "%s reports %d uncorrected ECC errors; it will take no more work",
                        known,
                        fresh.ecc_errors,
                    )
                self._cards[fresh.uuid] = replace(
                    known, memory_free=fresh.memory_free, ecc_errors=max(known.ecc_errors, fresh.ecc_errors)
                )

    def snapshot(self) -> PoolSnapshot:
        with self._lock:
            usable = [card for card in self._cards.values() if card.usable]
            free = [card for card in usable if card.uuid not in self._busy]
            return PoolSnapshot(
                cores_free=self._cores_free,
                cores_total=self._cores_total,
                ram_free=self._ram_free,
                ram_total=self._ram_total,
                disk_free=self._disk_free,
                disk_total=self._disk_total,
                gpu_slots_free=sum(card.slots for card in free),
                gpu_slots_total=sum(card.slots for card in usable),
                gpu_cards_free=len(free),
                gpu_cards_total=len(usable),
                gpu_mem_free_max=max((card.memory_free for card in free), default=0),
            )

    def _give_back(self, allocation: Allocation) -> None:
        with self._lock:
            if allocation.released:
                return
            allocation.released = True
            self._cores_free += allocation.cores
            self._ram_free += allocation.ram
            self._disk_free += allocation.disk
            self._busy.difference_update(card.uuid for card in allocation.gpus)
        log.debug("released %r", allocation)

    @staticmethod
    def _raise_if_short(shortfalls: list[tuple[str, bool]]) -> None:
        if shortfalls:
            raise ResourceUnavailable(
                "; ".join(message for message, _ in shortfalls),
                permanent=any(permanent for _, permanent in shortfalls),
            )

    def _evaluate(self, resources: Resources) -> tuple[list[Gpu], list[tuple[str, bool]]]:
        """The cards this request would get and what it lacks, each shortfall with its permanence; caller holds the lock."""
        shortfalls = [
            shortfall
            for shortfall in (
                _counter_shortfall("cores", resources.cpus, self._cores_free, self._cores_total, str),
                _counter_shortfall("RAM", resources.ram_bytes, self._ram_free, self._ram_total, format_size),
                _counter_shortfall(
                    "disk", resources.hdd_bytes, self._disk_free, self._disk_total, format_size
                ),
            )
            if shortfall
        ]
        cards, shortfall = self._pick_cards(resources)
        if shortfall:
            shortfalls.append(shortfall)
        return cards, shortfalls

    def _pick_cards(self, resources: Resources) -> tuple[list[Gpu], tuple[str, bool] | None]:
        wanted = _cards_wanted(resources)
        if not wanted:
            return [], None
        slots, memory = max(resources.gpus, 1), resources.gpu_mem_bytes
        need = f"needs {_plural(wanted, 'GPU card')} with ≥ {_plural(slots, 'slot')}"
        if memory:
            need += f" and ≥ {format_size(memory)} free memory each"
        if self.cpu_only:
            return [], (f"{need}; this runner was started with --cpu-only", True)
        if not self._cards:
            return [], (f"{need}; this runner has no GPU", True)
        faults = {uuid: self._card_fault(card, slots, memory) for uuid, card in self._cards.items()}
        eligible = sorted(
            (card for card in self._cards.values() if faults[card.uuid] is None),
            key=lambda card: (card.slots, card.memory_total, card.index),
        )
        if len(eligible) >= wanted:
            return eligible[:wanted], None
        could = sum(
            1
            for card in self._cards.values()
            if card.usable and card.slots >= slots and card.memory_total >= memory
        )
        reasons = "".join(
            f"; {card} {faults[card.uuid]}" for card in self._cards.values() if faults[card.uuid]
        )
        if could < wanted:
            return [], (f"{need}; this runner has {_plural(could, 'such card')} in all{reasons}", True)
        return [], (f"{need}; {_plural(len(eligible), 'such card')} free now{reasons}", False)

    def _card_fault(self, card: Gpu, slots: int, memory: int) -> str | None:
        """Why a card cannot take this request now, or None if it can."""
        if card.fenced:
            return "is fenced after ECC errors"
        if card.slots == 0:
            return "is disabled (0 slots)"
        if card.slots < slots:
            return "has too few slots"
        if card.memory_total < memory:
            return "has too little memory"
        if card.uuid in self._busy:
            return "is in use"
        if card.memory_free < memory:
            return "has too little memory free"
        return None
