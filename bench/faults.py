"""Fault figures: SIGKILLed runners, a lost ack, a RabbitMQ restart, a SeaweedFS outage, poison
messages, and how many generated inputs the request decoder and the scrape merger survive.

    .venv/bin/python bench/faults.py [--kills 20] [--requests 20] [--runners 2] [--trials 1]
                                     [--outage 8] [--examples 2000] [--skip-properties] [--seed N]

The scenarios are the functions in ``tests/runner/fault_scenarios.py`` (test_faults.py asserts
the same properties in CI), run here on a RabbitMQ and SeaweedFS of the bench's own (free loopback ports,
stopped at the end) with real ``studio-runner serve`` processes. The property counts come from
running the hypothesis suites in-process with ``STUDIO_HYPOTHESIS_EXAMPLES`` set to ``--examples``
and reading hypothesis's own statistics (passing + failing test cases over every phase).

Definitions: *completed once*: exactly one ``succeeded`` scrape document for the key, and the
``output.tar``/``modeldir.tar`` of that very attempt; *losses*: published requests that never
succeeded; *duplicates*: extra ``succeeded`` documents; *kills*: SIGKILLs that landed while the
runner held an unsettled message (its log shows the attempt begun and never settled);
*redeliveries*: attempts begun again after the first (from the runners' logs), each carrying
RabbitMQ's ``redelivered`` flag; *already-stored acks*: redeliveries acked without a second run
because the earlier attempt had stored its results. The exit status is 1 when any property failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
import tempfile
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devtools.services import Endpoints, private_services  # noqa: E402
from tests.runner.fault_scenarios import (  # noqa: E402
    FaultEnv,
    Figures,
    broker_restart_scenario,
    kill_scenario,
    lost_ack_scenario,
    poison_scenario,
    storage_outage_scenario,
)
from tests.runner.processes import RunnerProcess  # noqa: E402

PROPERTY_TARGETS = {
    "request decoder (decode_request)": "tests/runner/test_request_properties.py",
    "scrape merger (scrape, merge)": "tests/runner/test_metadata_properties.py",
    "open_message (envelopes, then the decoder)": "tests/runner/test_envelope_properties.py",
}
_CASES = re.compile(r"(\d+) passing, (\d+) failing, and (\d+) invalid test cases")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs that must land per trial")
    parser.add_argument("--requests", type=int, default=20, help="requests in the kill scenario")
    parser.add_argument("--runners", type=int, default=2, help="runners in the kill scenario")
    parser.add_argument("--trials", type=int, default=1, help="times each scenario runs")
    parser.add_argument("--outage", type=float, default=8.0, help="seconds SeaweedFS stays down")
    parser.add_argument("--examples", type=int, default=2000, help="STUDIO_HYPOTHESIS_EXAMPLES")
    parser.add_argument("--skip-properties", action="store_true")
    parser.add_argument("--seed", type=int, default=None, help="kill timing seed (first trial)")
    options = parser.parse_args()

    scenarios: list[tuple[str, Callable[[FaultEnv, int], Figures]]] = [
        (
            "kill",
            lambda env, trial: kill_scenario(
                env,
                requests=options.requests,
                kills=options.kills,
                runners=options.runners,
                seed=None if options.seed is None else options.seed + trial,
            ),
        ),
        ("lost ack", lambda env, trial: lost_ack_scenario(env)),
        ("broker restart", lambda env, trial: broker_restart_scenario(env)),
        ("storage outage", lambda env, trial: storage_outage_scenario(env, outage=options.outage)),
        ("poison", lambda env, trial: poison_scenario(env)),
    ]
    results: dict[str, list[Figures]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as scratch:
        root = Path(scratch)
        with private_services(root / "services") as services:
            endpoints = services.endpoints
            s3 = endpoints.s3_client()
            launcher = Launcher(endpoints, root)
            for trial in range(options.trials):
                for name, scenario in scenarios:
                    bucket = f"faults-{uuid.uuid4().hex[:16]}"
                    s3.create_bucket(Bucket=bucket)
                    scratch_dir = root / f"{name.replace(' ', '-')}-{trial}"
                    env = FaultEnv(endpoints, services, s3, bucket, launcher.start, scratch_dir)
                    print(f"trial {trial + 1}/{options.trials}: {name} ...", flush=True)
                    try:
                        figures = scenario(env, trial)
                    except Exception as error:  # a scenario that could not finish is a finding too
                        figures = Figures(scenario=name, problems=[f"{type(error).__name__}: {error}"])
                    finally:
                        launcher.stop_all()
                    results[name].append(figures)
                    print(f"  {len(figures.problems)} problem(s), {figures.seconds:.1f}s", flush=True)
    properties = {} if options.skip_properties else run_properties(options.examples)
    return report(results, properties, options)


# --- runners -----------------------------------------------------------------------------------------
class Launcher:
    """``studio-runner serve`` processes as the test fixture starts them; all stopped on request."""

    def __init__(self, endpoints: Endpoints, root: Path) -> None:
        self.endpoints = endpoints
        self.root = root
        self.cache = root / "runner-cache"
        self.started: list[RunnerProcess] = []

    def start(self, *options: str) -> RunnerProcess:
        number = len(self.started)
        log = self.root / f"runner-{number}.log"
        command = [
            str(Path(sys.executable).parent / "studio-runner"),
            "serve",
            "--working-dir",
            str(self.root / f"work-{number}"),
            "--cache-dir",
            str(self.cache),
            "--amqp-url",
            self.endpoints.amqp_url,
            "--amqp-mgt-url",
            self.endpoints.amqp_management_url,
            "--prom-address",
            "off",
            *options,
        ]
        env = {**os.environ, "AWS_DEFAULT_REGION": self.endpoints.region}
        with open(log, "wb") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        runner = RunnerProcess(process, log)
        self.started.append(runner)
        return runner

    def stop_all(self) -> None:
        for runner in self.started:
            runner.stop()


# --- property counts ---------------------------------------------------------------------------------
class _Statistics:
    """Reads hypothesis's statistics for each test, as its pytest plugin records them."""

    def __init__(self) -> None:
        self.tests: dict[str, dict[str, Any]] = {}

    def pytest_runtest_logreport(self, report: Any) -> None:
        row = self.tests.setdefault(report.nodeid, {"inputs": 0, "failing": 0, "seconds": 0.0, "ok": True})
        row["seconds"] += report.duration
        row["ok"] = row["ok"] and not report.failed
        statistics = report.__dict__.get("_hypothesis_stats")
        if report.when == "teardown" and statistics:
            for passing, failing, _invalid in _CASES.findall(statistics):
                row["inputs"] += int(passing) + int(failing)
                row["failing"] += int(failing)


def run_properties(examples: int) -> dict[str, dict[str, Any]]:
    import pytest

    os.environ["STUDIO_HYPOTHESIS_EXAMPLES"] = str(examples)
    statistics = _Statistics()
    print(f"running the property tests with STUDIO_HYPOTHESIS_EXAMPLES={examples} ...", flush=True)
    here = Path.cwd()
    output = io.StringIO()
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(output):
            status = pytest.main(["-q", *PROPERTY_TARGETS.values()], plugins=[statistics])
    finally:
        os.chdir(here)
    lines = output.getvalue().strip().splitlines()
    print(("\n".join(lines) if status else lines[-1]) if lines else f"pytest exited {status}", flush=True)
    totals: dict[str, dict[str, Any]] = {}
    for target, path in PROPERTY_TARGETS.items():
        rows = [row for nodeid, row in statistics.tests.items() if nodeid.startswith(path + "::")]
        generated = [row for row in rows if row["inputs"]]
        totals[target] = {
            "properties": len(generated),
            "inputs": sum(row["inputs"] for row in rows),
            "failing": sum(row["failing"] for row in rows),
            "failed tests": sum(1 for row in rows if not row["ok"]),
            "seconds": sum(row["seconds"] for row in generated),
        }
    return totals


# --- the table ---------------------------------------------------------------------------------------
def report(results: dict[str, list[Figures]], properties: dict[str, dict[str, Any]], options: Any) -> int:
    print()
    print(
        f"Fault figures ({options.trials} trial(s); kill scenario: {options.requests} requests, "
        f"{options.runners} runners, {options.kills} kills per trial)"
    )
    header = (
        f"{'scenario':<40}{'trials':>7}{'published':>10}{'completed once':>15}{'losses':>7}"
        f"{'duplicates':>11}{'kills':>6}{'redeliveries':>13}{'already-stored acks':>20}"
        f"{'dead-lettered':>14}{'outage s':>9}{'upload retries':>15}{'crashes':>8}{'wall s':>8}"
    )
    print(header)
    print("-" * len(header))
    problems: list[str] = []
    phases: Counter[str] = Counter()
    for runs in results.values():

        def total(field: str, runs: list[Figures] = runs) -> int:
            return sum(getattr(figures, field) for figures in runs)

        outage = sum(f.outage_seconds for f in runs)
        name = runs[0].scenario.split(" (seed")[0]
        print(
            f"{name:<40}{len(runs):>7}{total('published'):>10}{total('completed_once'):>15}"
            f"{total('losses'):>7}{total('duplicates'):>11}{total('kills'):>6}{total('redeliveries'):>13}"
            f"{total('already_done_acks'):>20}{total('dead_lettered'):>14}"
            f"{(f'{outage:.1f}' if outage else '-'):>9}{total('storage_retries'):>15}"
            f"{total('handler_crashes'):>8}{sum(f.seconds for f in runs):>8.1f}"
        )
        for figures in runs:
            phases.update(figures.kills_by_phase)
            problems += [f"{figures.scenario}: {problem}" for problem in figures.problems]
    if phases:
        print("kills by how far the attempt had got: " + ", ".join(f"{k} {v}" for k, v in phases.items()))
    seeds = [f.scenario for f in results.get("kill", [])]
    if seeds:
        print("kill timing: " + "; ".join(s.split("(", 1)[1].rstrip(")") for s in seeds))
    if properties:
        print()
        print(
            f"Property tests (STUDIO_HYPOTHESIS_EXAMPLES={options.examples}; inputs = hypothesis test cases run)"
        )
        header = f"{'target':<46}{'properties':>11}{'inputs tried':>14}{'crashes':>9}{'failed tests':>14}{'seconds':>9}"
        print(header)
        print("-" * len(header))
        for target, row in properties.items():
            print(
                f"{target:<46}{row['properties']:>11}{row['inputs']:>14,}{row['failing']:>9}"
                f"{row['failed tests']:>14}{row['seconds']:>9.1f}"
            )
            if row["failed tests"]:
                problems.append(f"{target}: {row['failed tests']} property test(s) failed")
    print()
    if problems:
        print(f"{len(problems)} problem(s):")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print("no problems: nothing lost, nothing run to success twice, every bad input refused with a reason")
    return 0


if __name__ == "__main__":
    sys.exit(main())
