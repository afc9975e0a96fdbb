from __future__ import annotations

import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from studio_runner.gpus import GIB, Gpu, inventory
from studio_runner.request import Resources
from studio_runner.resources import (
    DISK_SHARE,
    CgroupLimits,
    HostCapacity,
    ResourcePool,
    ResourceUnavailable,
    cgroup_limits,
    host_capacity,
)


def card(index: int, slots: int, memory_gib: float = 16, free_gib: float | None = None, ecc: int = 0) -> Gpu:
    return Gpu(
        index=index,
        uuid=f"GPU-{index:08x}-aaaa-bbbb-cccc-ddddeeeeffff",
        name=f"Test GPU {slots}",
        slots=slots,
        memory_total=int(memory_gib * GIB),
        memory_free=int((memory_gib if free_gib is None else free_gib) * GIB),
        ecc_errors=ecc,
    )


def need(**fields: object) -> Resources:
    return Resources.model_validate(fields)


def pool(
    *cards: Gpu, cores: int = 8, ram_gib: int = 32, disk_gib: int = 100, cpu_only: bool = False
) -> ResourcePool:
    return ResourcePool(cores=cores, ram=ram_gib * GIB, disk=disk_gib * GIB, gpus=cards, cpu_only=cpu_only)


# --- GPU allocation, ported from upstream internal/cuda/alloc_test.go -----------------------


def test_trivial_alloc_takes_the_only_card_then_fails() -> None:
    only = card(0, slots=1)
    runner = pool(only)
    first = runner.allocate(need(gpus=1, gpuCount=1))
    assert first.gpus == [only]
    with pytest.raises(ResourceUnavailable) as refused:
        runner.allocate(need(gpus=1, gpuCount=1))
    assert not refused.value.permanent
    assert "is in use" in str(refused.value)


def test_aggregate_alloc_single_cards_then_both_at_once() -> None:
    runner = pool(card(0, 1), card(1, 1))
    one, two = runner.allocate(need(gpus=1)), runner.allocate(need(gpus=1))
    assert {c.uuid for c in one.gpus} | {c.uuid for c in two.gpus} == {c.uuid for c in runner.gpus}
    one.release()
    two.release()
    both = runner.allocate(need(gpus=1, gpuCount=2))
    assert len(both.gpus) == 2
    both.release()
    assert runner.snapshot().gpu_cards_free == 2


def test_typical_alloc_prefers_the_smallest_card_that_fits() -> None:
    four_a, four_b, eight = card(0, 4), card(1, 4), card(2, 8)
    runner = pool(four_a, four_b)
    with runner.allocate(need(gpus=4, gpuCount=2)) as pair:
        assert pair.gpus == [four_a, four_b]
    runner = pool(eight, four_a, four_b)
    with runner.allocate(need(gpus=8)) as big:
        assert big.gpus == [eight]
    with runner.allocate(need(gpus=2)) as small:
        assert small.gpus == [four_a]
        with runner.allocate(need(gpus=3)) as next_small:
            assert next_small.gpus == [four_b]
    with pytest.raises(ResourceUnavailable) as refused:
        pool(four_a, four_b).allocate(need(gpus=8))
    assert refused.value.permanent


def test_bigger_cards_serve_smaller_requests_that_upstream_stranded() -> None:
    runner = pool(card(0, 80, memory_gib=80))
    with runner.allocate(need(gpus=16)) as allocation:
        assert allocation.gpus[0].slots == 80


def test_dry_runs_allocate_nothing() -> None:
    runner = pool(card(0, 1))
    for _ in range(4):
        assert runner.fits(need(gpus=1))
        runner.check(need(gpus=1))
    assert runner.snapshot().gpu_cards_free == 1
    assert not runner.fits(need(gpus=2, gpuCount=1))


def test_not_enough_cards() -> None:
    runner = pool(card(0, 16), card(1, 16), card(2, 8))
    with pytest.raises(ResourceUnavailable) as refused:
        runner.check(need(gpus=16, gpuCount=3))
    assert refused.value.permanent
    assert str(refused.value) == (
        "needs 3 GPU cards with ≥ 16 slots; this runner has 2 such cards in all; "
        "GPU 2 Test GPU 8 (8 slots, 16.0GiB free) has too few slots"
    )
    held = runner.allocate(need(gpus=16))
    with pytest.raises(ResourceUnavailable) as refused:
        runner.check(need(gpus=16, gpuCount=2))
    assert not refused.value.permanent
    assert "1 such card free now" in str(refused.value)
    held.release()
    runner.check(need(gpus=16, gpuCount=2))
    with pytest.raises(ResourceUnavailable) as refused:
        pool(card(0, 16)).check(need(gpus=16, gpuCount=2))
    assert str(refused.value) == "needs 2 GPU cards with ≥ 16 slots; this runner has 1 such card in all"


def test_gpu_memory_must_be_free_on_each_card() -> None:
    busy_memory = card(0, 16, memory_gib=32, free_gib=10)
    roomy = card(1, 16, memory_gib=16, free_gib=15)
    runner = pool(busy_memory, roomy)
    with runner.allocate(need(gpus=16, gpuMem="12GiB")) as allocation:
        assert allocation.gpus == [roomy]
    with pytest.raises(ResourceUnavailable) as refused:
        runner.check(need(gpus=16, gpuMem="20GiB"))
    assert not refused.value.permanent  # the 32 GiB card may free up
    assert "≥ 20.0GiB free memory each" in str(refused.value)
    with pytest.raises(ResourceUnavailable) as refused:
        runner.check(need(gpus=16, gpuMem="40GiB"))
    assert refused.value.permanent


def test_an_ecc_fenced_card_is_never_used() -> None:
    fenced, healthy = card(0, 16, ecc=1), card(1, 16)
    runner = pool(fenced, healthy)
    with runner.allocate(need(gpus=16)) as allocation:
        assert allocation.gpus == [healthy]
    with pytest.raises(ResourceUnavailable) as refused:
        runner.check(need(gpus=16, gpuCount=2))
    assert refused.value.permanent
    assert "fenced after ECC errors" in str(refused.value)
    assert runner.snapshot().gpu_cards_total == 1


def test_refresh_fences_cards_for_good_and_updates_free_memory() -> None:
    first, second = card(0, 16), card(1, 16)
    runner = pool(first, second)
    runner.refresh_gpus([replace(first, ecc_errors=2), replace(second, memory_free=3 * GIB)])
    assert runner.snapshot().gpu_mem_free_max == 3 * GIB
    runner.refresh_gpus([first])  # the volatile counter reset, e.g. after a driver reload
    snapshot = runner.snapshot()
    assert (snapshot.gpu_cards_total, snapshot.gpu_slots_total) == (1, 16)
    with pytest.raises(ResourceUnavailable):
        runner.check(need(gpus=16, gpuMem="4GiB"))


def test_cards_are_released_after_use() -> None:
    runner = pool(card(0, 16), card(1, 16))
    with runner.allocate(need(gpus=16, gpuCount=2, cpus=2, ram="4GiB", hdd="10GiB")):
        snapshot = runner.snapshot()
        assert (snapshot.gpu_cards_free, snapshot.gpu_slots_free, snapshot.gpu_mem_free_max) == (0, 0, 0)
        assert (snapshot.cores_free, snapshot.ram_free, snapshot.disk_free) == (6, 28 * GIB, 90 * GIB)
    snapshot = runner.snapshot()
    assert (snapshot.gpu_cards_free, snapshot.gpu_slots_free, snapshot.cores_free) == (2, 32, 8)
    assert (snapshot.ram_free, snapshot.disk_free, snapshot.gpu_mem_free_max) == (
        32 * GIB,
        100 * GIB,
        16 * GIB,
    )


def test_release_is_idempotent_and_never_frees_another_holders_card() -> None:
    runner = pool(card(0, 16), cores=4)
    first = runner.allocate(need(gpus=16, cpus=2))
    first.release()
    second = runner.allocate(need(gpus=16, cpus=2))
    first.release()
    assert first.released and not second.released
    assert not runner.fits(need(gpus=16))
    assert runner.snapshot().cores_free == 2


def test_gpu_count_defaults_to_one_and_gpu_mem_alone_asks_for_a_card() -> None:
    runner = pool(card(0, 16), card(1, 16))
    with runner.allocate(need(gpus=16)) as allocation:
        assert len(allocation.gpus) == 1
    with runner.allocate(need(gpuMem="1GiB")) as allocation:
        assert len(allocation.gpus) == 1


@pytest.mark.parametrize("fields", [{}, {"gpuCount": 2}, {"gpus": 0, "gpuMem": "", "gpuCount": 1}])
def test_no_gpu_unless_slots_or_memory_are_asked_for(fields: dict[str, object]) -> None:
    runner = pool(card(0, 16), cpu_only=False)
    with runner.allocate(need(**fields)) as allocation:
        assert allocation.gpus == []
        assert allocation.env()["CUDA_VISIBLE_DEVICES"] == "-1"


# --- CPU, RAM, disk --------------------------------------------------------------------------


def test_permanent_and_temporary_shortfalls_of_cores_ram_and_disk() -> None:
    runner = pool(cores=8, ram_gib=32, disk_gib=100)
    for fields, words in (
        ({"cpus": 9}, "needs 9 cores; this runner has 8 in all"),
        ({"ram": "64GiB"}, "needs 64.0GiB RAM; this runner has 32.0GiB in all"),
        ({"hdd": "1TiB"}, "needs 1.0TiB disk; this runner has 100.0GiB in all"),
    ):
        with pytest.raises(ResourceUnavailable, match=words) as refused:
            runner.check(need(**fields))
        assert refused.value.permanent
    with runner.allocate(need(cpus=6, ram="30GiB", hdd="50GiB")):
        with pytest.raises(ResourceUnavailable) as refused:
            runner.check(need(cpus=4, ram="4GiB", hdd="10GiB"))
        assert not refused.value.permanent
        message = str(refused.value)
        assert "needs 4 cores; 2 of 8 free now" in message
        assert "needs 4.0GiB RAM; 2.0GiB of 32.0GiB free now" in message
        assert "disk" not in message
        with pytest.raises(ResourceUnavailable) as refused:
            runner.check(need(cpus=4, ram="64GiB"))
        assert refused.value.permanent  # one part can never fit, so the whole never can


def test_gpu_requests_on_a_cpu_only_runner_are_permanently_refused() -> None:
    runner = pool(card(0, 16), cpu_only=True)
    assert runner.gpus == []
    with pytest.raises(ResourceUnavailable, match="--cpu-only") as refused:
        runner.check(need(gpus=1))
    assert refused.value.permanent
    with pytest.raises(ResourceUnavailable, match="no GPU") as refused:
        pool().check(need(gpus=1))
    assert refused.value.permanent


def test_empty_ram_and_hdd_reserve_nothing() -> None:
    runner = pool()
    with runner.allocate(need(cpus=1, ram="", hdd=None)) as allocation:
        assert (allocation.ram, allocation.disk) == (0, 0)
        snapshot = runner.snapshot()
        assert (snapshot.ram_free, snapshot.disk_free) == (32 * GIB, 100 * GIB)


# --- environment -----------------------------------------------------------------------------


def test_env_leaves_one_core_for_io_and_lists_card_uuids() -> None:
    first, second = card(0, 16), card(1, 16)
    runner = pool(first, second)
    with runner.allocate(need(cpus=4, gpus=16, gpuCount=2)) as allocation:
        assert allocation.env() == {
            "OPENMP": "True",
            "MKL_NUM_THREADS": "3",
            "GOTO_NUM_THREADS": "3",
            "OMP_NUM_THREADS": "3",
            "CUDA_VISIBLE_DEVICES": f"{first.uuid},{second.uuid}",
            "NVIDIA_VISIBLE_DEVICES": f"{first.uuid},{second.uuid}",
        }


@pytest.mark.parametrize("cpus", [0, 1])
def test_env_without_threads_or_cards(cpus: int) -> None:
    with pool().allocate(need(cpus=cpus)) as allocation:
        assert allocation.env() == {"CUDA_VISIBLE_DEVICES": "-1", "NVIDIA_VISIBLE_DEVICES": "-1"}


# --- concurrency -----------------------------------------------------------------------------

request_strategy = st.builds(
    lambda cpus, ram, gpus, count: need(cpus=cpus, ram=f"{ram}GiB", gpus=gpus, gpuCount=count),
    st.integers(0, 4),
    st.integers(0, 8),
    st.sampled_from([0, 0, 1, 8, 16, 24]),
    st.integers(0, 2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(request_strategy, min_size=1, max_size=24))
def test_threads_never_over_allocate(requests: list[Resources]) -> None:
    runner = pool(card(0, 8), card(1, 16), card(2, 16), card(3, 24), cores=8, ram_gib=16)
    start = threading.Barrier(len(requests))

    def attempt(request: Resources):
        start.wait()
        try:
            return runner.allocate(request)
        except ResourceUnavailable:
            return None

    with ThreadPoolExecutor(max_workers=len(requests)) as threads:
        held = [allocation for allocation in threads.map(attempt, requests) if allocation]
    uuids = [gpu.uuid for allocation in held for gpu in allocation.gpus]
    assert len(uuids) == len(set(uuids))
    assert sum(allocation.cores for allocation in held) <= 8
    assert sum(allocation.ram for allocation in held) <= 16 * GIB
    snapshot = runner.snapshot()
    assert snapshot.cores_free == 8 - sum(allocation.cores for allocation in held)
    assert snapshot.gpu_cards_free == 4 - len(uuids)
    for allocation in held:
        allocation.release()
    assert (
        runner.snapshot()
        == pool(card(0, 8), card(1, 16), card(2, 16), card(3, 24), cores=8, ram_gib=16).snapshot()
    )


def test_threads_allocating_and_releasing_never_overlap() -> None:
    runner = pool(card(0, 16), card(1, 16), cores=4, ram_gib=8)
    in_use = {"cores": 0, "ram": 0}
    holders: set[str] = set()
    guard = threading.Lock()
    failures: list[str] = []

    def worker(seed: int) -> None:
        for round_ in range(200):
            request = need(cpus=1 + (seed + round_) % 3, ram="3GiB", gpus=16 if (seed + round_) % 2 else 0)
            try:
                allocation = runner.allocate(request)
            except ResourceUnavailable:
                continue
            with guard:
                in_use["cores"] += allocation.cores
                in_use["ram"] += allocation.ram
                if (
                    in_use["cores"] > 4
                    or in_use["ram"] > 8 * GIB
                    or holders & {g.uuid for g in allocation.gpus}
                ):
                    failures.append(f"over-allocated: {in_use} {holders} {allocation!r}")
                holders.update(g.uuid for g in allocation.gpus)
            with guard:
                in_use["cores"] -= allocation.cores
                in_use["ram"] -= allocation.ram
                holders.difference_update(g.uuid for g in allocation.gpus)
            allocation.release()

    with ThreadPoolExecutor(max_workers=8) as threads:
        list(threads.map(worker, range(8)))
    assert failures == []
    assert runner.snapshot().cores_free == 4


# --- cgroups and the host --------------------------------------------------------------------


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_cgroup_v2_container_limits(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpuset cpu io memory pids")
    write(root / "cpu.max", "150000 100000")
    write(root / "memory.max", str(2 * GIB))
    write(tmp_path / "self", "0::/")
    assert cgroup_limits(root, tmp_path / "self") == CgroupLimits(cpus=1.5, memory=2 * GIB)


def test_cgroup_v2_without_limits(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpu memory")
    write(root / "cpu.max", "max 100000")
    write(root / "memory.max", "max")
    write(tmp_path / "self", "0::/")
    assert cgroup_limits(root, tmp_path / "self") == CgroupLimits()


def test_cgroup_v2_service_takes_the_tightest_ancestor(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    service = root / "system.slice" / "studio-runner.service"
    write(root / "cgroup.controllers", "cpu memory")
    write(root / "system.slice" / "memory.max", str(GIB))
    write(root / "system.slice" / "cpu.max", "max 100000")
    write(service / "memory.max", str(4 * GIB))
    write(service / "cpu.max", "400000 100000")
    write(tmp_path / "self", "0::/system.slice/studio-runner.service")
    assert cgroup_limits(root, tmp_path / "self") == CgroupLimits(cpus=4.0, memory=GIB)


def test_cgroup_v2_path_not_mounted_reads_the_mount_itself(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpu memory")
    write(root / "cpu.max", "200000 100000")
    write(tmp_path / "self", "0::/kubepods/pod1234/abcdef")
    assert cgroup_limits(root, tmp_path / "self") == CgroupLimits(cpus=2.0, memory=None)


def test_cgroup_v1_limits(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cpu" / "cpu.cfs_quota_us", "250000")
    write(root / "cpu" / "cpu.cfs_period_us", "100000")
    write(root / "memory" / "memory.limit_in_bytes", str(3 * GIB))
    write(root / "memory" / "docker" / "abc" / "memory.limit_in_bytes", "9223372036854771712")
    write(tmp_path / "self", "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc")
    assert cgroup_limits(root, tmp_path / "self") == CgroupLimits(cpus=2.5, memory=3 * GIB)


def test_cgroup_v1_unlimited(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cpu" / "cpu.cfs_quota_us", "-1")
    write(root / "cpu" / "cpu.cfs_period_us", "100000")
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712")
    assert cgroup_limits(root, tmp_path / "missing") == CgroupLimits()


def test_host_capacity_applies_cgroup_limits(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpu memory")
    write(root / "cpu.max", "50000 100000")
    write(root / "memory.max", str(GIB))
    write(tmp_path / "self", "0::/")
    host = host_capacity(tmp_path, cgroup_root=root, membership=tmp_path / "self")
    assert (host.cores, host.ram) == (1, GIB)
    assert host.disk_free > 0


def test_host_capacity_without_cgroup_limits(tmp_path: Path) -> None:
    host = host_capacity(tmp_path, cgroup_root=tmp_path / "none", membership=tmp_path / "none")
    assert host.cores == len(os.sched_getaffinity(0))
    assert host.ram == psutil.virtual_memory().total


HOST = HostCapacity(cores=4, ram=8 * GIB, disk_free=100 * GIB)


@pytest.mark.parametrize(
    ("limits", "words"),
    [
        ({"max_cores": 5}, "--max-cores 5 is more than the 4"),
        ({"max_mem": 9 * GIB}, "--max-mem 9.0GiB is more than the 8.0GiB"),
        ({"max_disk": 101 * GIB}, "--max-disk 101.0GiB is more than the 100.0GiB"),
        ({"max_cores": -1}, "negative"),
    ],
)
def test_limits_above_the_hardware_stop_start_up(tmp_path: Path, limits: dict[str, int], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ResourcePool.from_host(working_dir=tmp_path, cpu_only=True, host=HOST, **limits)


def test_limits_and_defaults(tmp_path: Path) -> None:
    defaults = ResourcePool.from_host(working_dir=tmp_path, cpu_only=True, host=HOST).snapshot()
    assert (defaults.cores_total, defaults.ram_total, defaults.disk_total) == (
        4,
        8 * GIB,
        int(100 * GIB * DISK_SHARE),
    )
    limited = ResourcePool.from_host(
        working_dir=tmp_path, max_cores=2, max_mem=GIB, max_disk=100 * GIB, cpu_only=True, host=HOST
    ).snapshot()
    assert (limited.cores_total, limited.ram_total, limited.disk_total) == (2, GIB, 100 * GIB)


def test_a_gpu_runner_without_a_usable_gpu_does_not_start(tmp_path: Path) -> None:
    for cards in ([], [card(0, 16, ecc=1)], [card(0, 0)]):
        with pytest.raises(ValueError, match="--cpu-only"):
            ResourcePool.from_host(working_dir=tmp_path, gpus=cards, host=HOST)
    runner = ResourcePool.from_host(working_dir=tmp_path, gpus=[card(0, 16), card(1, 0)], host=HOST)
    assert runner.snapshot().gpu_cards_total == 1


def test_from_host_on_this_machine(tmp_path: Path) -> None:
    runner = ResourcePool.from_host(working_dir=tmp_path, cpu_only=True)
    snapshot = runner.snapshot()
    assert snapshot.cores_total == host_capacity(tmp_path).cores >= 1
    assert 0 < snapshot.ram_total <= psutil.virtual_memory().total
    assert 0 < snapshot.disk_total < shutil.disk_usage(tmp_path).free + GIB
    assert (snapshot.gpu_cards_total, snapshot.gpu_slots_total) == (0, 0)
    with runner.allocate(need(cpus=1, ram="1MiB", hdd="1MiB")) as allocation:
        assert allocation.env()["CUDA_VISIBLE_DEVICES"] == "-1"
    cards = inventory()
    if any(gpu.usable for gpu in cards):
        assert ResourcePool.from_host(working_dir=tmp_path).snapshot().gpu_cards_total == sum(
            gpu.usable for gpu in cards
        )
    else:
        with pytest.raises(ValueError, match="--cpu-only"):
            ResourcePool.from_host(working_dir=tmp_path)
