"""Fault scenarios with real processes: SIGKILLed runners, a RabbitMQ restart, a SeaweedFS outage, poison.

Each scenario is a plain function that runs real ``studio-runner serve`` processes against a
RabbitMQ and SeaweedFS and returns its figures and the problems it found; test_faults.py asserts
on them, and ``bench/faults.py`` runs the very same functions (with more trials) to print the
figures, which is why they live in a helper module rather than in the test module. What "done exactly once" means here:

- a request is *completed* when exactly one scrape document of its key has status ``succeeded``;
  killed attempts may leave no document or a ``running`` one (the audit trail), never another
  ``succeeded``, ``failed`` or other final one;
- its ``output.tar`` and ``modeldir.tar`` come from that attempt: the workload writes a random
  token into ``modeldir`` and prints it, so the token in the succeeded document, in ``output``
  and in ``modeldir`` must agree, and ``output`` names the document's attempt (accession);
- the work queue and its ``_rejected`` queue are empty at the end.

A kill is a crash: the runner never settles the message, so RabbitMQ returns it to the queue
with ``redelivered`` set and the attempt count unchanged; ``--max-attempts`` is set high all the
same, so that a kill counted by mistake would show as a count above 1 rather than a dead letter.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shlex
import signal
import socket
import tarfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from devtools.services import Endpoints, ServiceSet
from tests.broker import dead_letters, management, publish_like_client, queue_depth, unique_queue
from tests.polling import wait_for
from tests.runner.client_requests import client_request, upload_blob, workspace_tar

SCRAPE_PREFIX = "metadata/scrape-host-"
START = re.compile(
    r"^experiment (?P<key>\S+) from (?P<queue>\S+) \(attempt (?P<attempt>\d+)(?P<redelivered>, redelivered)?\)$"
)
ALREADY_DONE = "already stored"  # the runner's words when a redelivered request had in fact succeeded

WORKLOAD = """\
import json, os, random, sys, time, uuid
key, low, high = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
token = uuid.uuid4().hex
print(f"start {key} token {token}", flush=True)
time.sleep(random.uniform(low, high))
os.makedirs("../modeldir", exist_ok=True)
with open("../modeldir/weights.json", "w") as out:
    json.dump({"key": key, "token": token}, out)
print(json.dumps({"experiment": {"token": token}}), flush=True)
print(f"done {key} token {token}", flush=True)
"""
"""Sleeps a random while, then writes a model; the token ties output, modeldir and scrape document."""

GATED = """\
import json, os, sys, time, uuid
key, started, release = sys.argv[1], sys.argv[2], sys.argv[3]
token = uuid.uuid4().hex
os.makedirs("../modeldir", exist_ok=True)
with open("../modeldir/weights.json", "w") as out:
    json.dump({"key": key, "token": token}, out)
print(f"start {key} token {token}", flush=True)
open(started, "w").close()
deadline = time.time() + 120
while not os.path.exists(release) and time.time() < deadline:
    time.sleep(0.1)
print(json.dumps({"experiment": {"token": token}}), flush=True)
print(f"done {key} token {token}", flush=True)
"""
"""Like WORKLOAD, but ends when the test creates ``release``: the uploads start when the test says."""


# --- what the scenarios need ----------------------------------------------------------------------
class Runner(Protocol):
    """A ``studio-runner serve`` process (``tests/runner/processes.py``'s RunnerProcess, or the bench's)."""

    process: Any
    log: Path

    def stop(self, timeout: float = 60.0) -> int: ...

    def events(self) -> list[dict]: ...


@dataclass
class FaultEnv:
    """Servers, a bucket and a way to start runners: all a scenario touches."""

    services: Endpoints
    service_set: ServiceSet
    s3: Any
    bucket: str
    start_runner: Callable[..., Runner]
    scratch: Path


@dataclass
class Figures:
    """What one scenario did and found; ``problems`` is empty when every property held."""

    scenario: str
    published: int = 0
    completed: int = 0
    completed_once: int = 0
    duplicates: int = 0
    kills: int = 0
    kills_by_phase: dict[str, int] = field(default_factory=dict)
    attempts_started: int = 0
    redeliveries: int = 0
    redelivered_flags: int = 0
    already_done_acks: int = 0
    highest_attempt: int = 0
    dead_lettered: int = 0
    outage_seconds: float = 0.0
    storage_retries: int = 0
    handler_crashes: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def losses(self) -> int:
        """Requests published that never succeeded at all."""
        return self.published - self.completed


@dataclass
class Kill:
    key: str
    phase: str
    targeted: bool


# --- helpers ----------------------------------------------------------------------------------------
def publish(env: FaultEnv, queue: str, keys: list[str], script: str, *args: str) -> None:
    """Client-shaped requests running ``script`` with ``key, *args``, published persistent (durable queue)."""
    workspace_key = upload_blob(env.s3, env.bucket, workspace_tar({"train.py": script.encode()}))
    quoted = tuple(shlex.quote(arg) for arg in args)  # the client shell-quotes each argument
    bodies = [
        json.dumps(client_request(env.services, env.bucket, key, workspace_key, args=(key, *quoted))).encode()
        for key in keys
    ]
    publish_like_client(env.services.amqp_url, queue, bodies, persistent=True)


def runner_options(queue: str, *more: str) -> tuple[str, ...]:
    return ("--queue-match", f"^{queue}$", "--max-attempts", "1000", *more)


def tar_members(s3: Any, bucket: str, key: str) -> dict[str, bytes]:
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except s3.exceptions.NoSuchKey:
        return {}
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}  # type: ignore[union-attr]


def scrape_index(s3: Any, bucket: str) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Every scrape document in the bucket by experiment key: ``(object key, document)``."""
    index: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=SCRAPE_PREFIX):
        for item in page.get("Contents", []):
            document = json.loads(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
            key = document.get("studioml", {}).get("experiment", {}).get("key")
            index[key].append((item["Key"], document))
    return index


def succeeded_keys(s3: Any, bucket: str) -> set[str]:
    return {
        key
        for key, documents in scrape_index(s3, bucket).items()
        if any(d["studioml"].get("status") == "succeeded" for _, d in documents)
    }


def check_results(env: FaultEnv, queue: str, keys: list[str], figures: Figures) -> None:
    """The definition of done exactly once (module docstring), for every key; problems are noted."""
    index = scrape_index(env.s3, env.bucket)
    for key in keys:
        documents = index.get(key, [])
        statuses = Counter(d["studioml"].get("status") for _, d in documents)
        unexpected = {s: n for s, n in statuses.items() if s not in ("succeeded", "running")}
        if unexpected:
            figures.problems.append(f"{key}: unexpected scrape statuses {unexpected}")
        finals = [(name, d) for name, d in documents if d["studioml"].get("status") == "succeeded"]
        if not finals:
            figures.problems.append(f"{key}: no succeeded scrape document (statuses {dict(statuses)})")
            continue
        figures.completed += 1
        if len(finals) > 1:
            figures.duplicates += len(finals) - 1
            figures.problems.append(
                f"{key}: {len(finals)} succeeded scrape documents {[n for n, _ in finals]}"
            )
            continue
        name, document = finals[0]
        token = document.get("experiment", {}).get("token")
        accession = name[len(SCRAPE_PREFIX) : -len(".json")]
        output = (
            tar_members(env.s3, env.bucket, f"experiments/{key}/output.tar").get("./output", b"").decode()
        )
        model = tar_members(env.s3, env.bucket, f"experiments/{key}/modeldir.tar").get("./weights.json")
        complete = True
        if not token or f"done {key} token {token}" not in output:
            figures.problems.append(f"{key}: output.tar is not from the succeeded attempt (token {token})")
            complete = False
        if f"attempt {accession} " not in output:
            figures.problems.append(f"{key}: output.tar does not name the succeeded attempt {accession}")
            complete = False
        if model is None or json.loads(model) != {"key": key, "token": token}:
            figures.problems.append(f"{key}: modeldir.tar is not from the succeeded attempt: {model!r}")
            complete = False
        if complete:
            figures.completed_once += 1
    depth = queue_depth(env.services.amqp_management_url, queue)
    if depth:
        figures.problems.append(f"{queue} still holds {depth} message(s)")
    dead = dead_letters(env.services, queue)
    figures.dead_lettered += len(dead)
    for _body, headers in dead:
        figures.problems.append(f"dead-lettered: {headers.get('x-studio-reject-reason')}")


def starts(runners: list[Runner]) -> list[tuple[str, int, bool]]:
    """``(key, attempt, redelivered)`` for every attempt the runners began, from their logs."""
    found = []
    for runner in runners:
        for event in runner.events():
            match = START.match(event.get("msg", ""))
            if match:
                found.append((match["key"], int(match["attempt"]), bool(match["redelivered"])))
    return found


def count_log_figures(runners: list[Runner], figures: Figures) -> None:
    begun = starts(runners)
    per_key = Counter(key for key, _, _ in begun)
    figures.attempts_started = len(begun)
    figures.redeliveries = sum(n - 1 for n in per_key.values())
    figures.redelivered_flags = sum(1 for _, _, flag in begun if flag)
    figures.highest_attempt = max((attempt for _, attempt, _ in begun), default=0)
    for runner in runners:
        for event in runner.events():
            message = event.get("msg", "")
            if ALREADY_DONE in message and event.get("logger") == "studio_runner.experiment":
                figures.already_done_acks += 1
            if message.startswith("the handler failed"):
                figures.handler_crashes += 1
                figures.problems.append(f"handler crash: {event.get('error', '')[-300:]}")
            if (
                "failed (" in message
                and "; retry " in message
                and event.get("logger") == "studio_runner.storage"
            ):
                figures.storage_retries += 1


def holding(runner: Runner) -> str | None:
    """The key of the experiment the runner holds now, from its log (None when it holds none)."""
    key = None
    for event in runner.events():
        message = event.get("msg", "")
        match = START.match(message)
        if match:
            key = match["key"]
        elif message.startswith("request from ") and " ended " in message:
            key = None
    return key


def phase(runner: Runner, key: str) -> str:
    """How far the runner's attempt at ``key`` got, from the log lines since it began."""
    reached = "fetching"
    for event in runner.events():
        message = event.get("msg", "")
        match = START.match(message)
        if match and match["key"] == key:
            reached = "fetching"
        elif event.get("experiment") != key:
            continue
        elif message.startswith("fetched "):
            reached = "running"
        elif message.startswith("uploaded ") and " results of " in message:
            reached = "results stored, not acked"
        elif message.startswith("uploaded ") and reached == "running":
            reached = "uploading"
    return reached


def descendants(pid: int) -> list[int]:
    """Processes started by ``pid``, at any depth (the workload and what it started), from /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        children[parent].append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_node(runner: Runner) -> None:
    """What a vanished spot node does to a runner: SIGKILL, and its workload dies with it."""
    orphans = descendants(runner.process.pid)
    runner.process.send_signal(signal.SIGKILL)
    runner.process.wait()
    for pid in orphans:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop_all(runners: list[Runner]) -> None:
    for runner in runners:
        runner.stop()


def settle(env: FaultEnv, queue: str, keys: list[str], timeout: float, figures: Figures) -> None:
    """Wait for every key to succeed and the queue to empty; a timeout is a problem, not an error,
    so that the figures still count what was lost."""
    try:
        wait_for(
            lambda: (
                set(keys) <= succeeded_keys(env.s3, env.bucket)
                and queue_depth(env.services.amqp_management_url, queue) == 0
            ),
            timeout,
            "every request to succeed and the queue to empty",
            interval=1.0,
        )
    except AssertionError as error:
        figures.problems.append(str(error))


# --- scenarios ----------------------------------------------------------------------------------------
def kill_scenario(
    env: FaultEnv, *, requests: int = 20, kills: int = 20, runners: int = 2, seed: int | None = None
) -> Figures:
    """``requests`` experiments (1-3 s each) on ``runners`` runners; SIGKILL a runner that holds an
    experiment until ``kills`` kills have landed, restarting it each time, then check that each
    request is done exactly once. Most kills come at a random moment of the attempt; every fourth
    waits for the log to say the results are stored, to aim at the gap before the ack.

    A kill *landed* when the dead runner's log shows an attempt begun and never settled: its
    settle line is written before the ack is sent, so such a message was certainly unacked.
    """
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    figures = Figures(scenario=f"SIGKILL during experiments (seed {seed})", published=requests)
    began = time.monotonic()
    queue = unique_queue("rmq_faults_kill")
    keys = [f"k{n:02d}_{queue}" for n in range(requests)]
    publish(env, queue, keys, WORKLOAD, "1", "3")
    live = [env.start_runner(*runner_options(queue)) for _ in range(runners)]
    everyone = list(live)
    landed: list[Kill] = []
    missed = 0
    deadline = time.monotonic() + 60 + 10 * kills
    try:
        while len(landed) < kills and time.monotonic() < deadline:
            holders = [index for index, runner in enumerate(live) if holding(runner)]
            if not holders:
                if set(keys) <= succeeded_keys(env.s3, env.bucket):
                    break  # every request finished before the kills ran out
                time.sleep(0.05)
                continue
            index = rng.choice(holders)
            victim = live[index]
            key = holding(victim)
            targeted = (len(landed) + missed) % 4 == 3
            if targeted:  # the ack follows the stored results within milliseconds: poll the log closely
                until = time.monotonic() + 10
                while time.monotonic() < until and holding(victim) == key:
                    if phase(victim, key) == "results stored, not acked":
                        break
                    time.sleep(0.005)
            else:
                time.sleep(rng.uniform(0.0, 1.5))
            kill_node(victim)
            held = holding(victim)  # the log is complete now: did it die holding an unsettled message?
            if held is None:
                missed += 1
            else:
                landed.append(Kill(held, phase(victim, held), targeted))
            live[index] = env.start_runner(*runner_options(queue))
            everyone.append(live[index])
        settle(env, queue, keys, 120 + 10 * requests, figures)
    finally:
        stop_all(live)
    figures.kills = len(landed)
    figures.kills_by_phase = dict(Counter(kill.phase for kill in landed))
    if missed:
        figures.kills_by_phase["after its ack (not counted)"] = missed
    count_log_figures(everyone, figures)
    check_results(env, queue, keys, figures)
    begun = starts(everyone)
    began_per_key = Counter(key for key, _, _ in begun)
    killed_per_key = Counter(kill.key for kill in landed)
    for key, count in killed_per_key.items():
        if began_per_key[key] < count + 1:
            figures.problems.append(f"{key} was killed {count} time(s) but began only {began_per_key[key]}")
    fresh = Counter(key for key, _, redelivered in begun if not redelivered)
    for key, count in fresh.items():
        if count > 1:
            figures.problems.append(f"{key} was delivered {count} times without the redelivered flag")
    if figures.highest_attempt > 1:
        figures.problems.append(f"a kill was counted as an attempt (attempt {figures.highest_attempt} seen)")
    figures.seconds = time.monotonic() - began
    return figures


def start_gated(env: FaultEnv, queue: str, key: str) -> tuple[Runner, Path, Path]:
    """One GATED request on ``queue`` and a runner for it; the workload creates the first path once
    it runs and ends when the test creates the second."""
    gate = env.scratch / f"gate-{uuid.uuid4().hex[:8]}"
    gate.mkdir(parents=True)
    started, release = gate / "started", gate / "release"
    publish(env, queue, [key], GATED, str(started), str(release))
    return env.start_runner(*runner_options(queue)), started, release


def lost_ack_scenario(env: FaultEnv) -> Figures:
    """The broker drops the runner's connection mid-run: the attempt still stores its results, its
    ack fails, the message comes back redelivered, and that delivery is acked without a second run."""
    figures = Figures(scenario="connection lost before the ack", published=1)
    began = time.monotonic()
    queue = unique_queue("rmq_faults_ack")
    key = f"a_{queue}"
    runner, started, release = start_gated(env, queue, key)
    try:
        wait_for(started.exists, 120, "the workload to start")
        name = wait_for(lambda: _connection_holding(env, queue), 30, "the runner's connection to show")
        management(env.services.amqp_management_url, f"/api/connections/{quote(name, safe='')}", "DELETE")
        release.touch()
        settle(env, queue, [key], 120, figures)
    finally:
        runner.stop()
    count_log_figures([runner], figures)
    check_results(env, queue, [key], figures)
    if figures.already_done_acks != 1:
        figures.problems.append(f"{figures.already_done_acks} acks of an already stored result, not 1")
    figures.seconds = time.monotonic() - began
    return figures


def _connection_holding(env: FaultEnv, queue: str) -> str | None:
    """The management API's name of the connection a runner opened to take from ``queue``."""
    for connection in management(env.services.amqp_management_url, "/api/connections") or []:
        if connection.get("client_properties", {}).get("connection_name") == f"studio-runner {queue}":
            return connection["name"]
    return None


def broker_restart_scenario(env: FaultEnv, *, requests: int = 5) -> Figures:
    """Persistent requests wait in a durable queue, one is in flight; RabbitMQ restarts. None is lost."""
    figures = Figures(scenario="RabbitMQ restart with requests waiting", published=requests)
    began = time.monotonic()
    queue = unique_queue("rmq_faults_broker")
    keys = [f"b{n:02d}_{queue}" for n in range(requests)]
    publish(env, queue, keys, WORKLOAD, "1", "2")
    runner = env.start_runner(*runner_options(queue))
    try:
        wait_for(lambda: holding(runner), 120, "the runner to take a request")
        stopped = time.monotonic()
        env.service_set.stop_rabbitmq()
        env.service_set.start_rabbitmq()
        figures.outage_seconds = time.monotonic() - stopped
        settle(env, queue, keys, 120 + 10 * requests, figures)
        if runner.process.poll() is not None:
            figures.problems.append("the runner exited during the broker restart")
    finally:
        runner.stop()
    count_log_figures([runner], figures)
    check_results(env, queue, keys, figures)
    figures.seconds = time.monotonic() - began
    return figures


def storage_outage_scenario(env: FaultEnv, *, outage: float = 8.0) -> Figures:
    """SeaweedFS goes away while an experiment's results are due and comes back ``outage`` seconds
    (at least) after its S3 port stopped answering; the uploads retry through it."""
    figures = Figures(scenario="SeaweedFS stopped during uploads", published=1)
    began = time.monotonic()
    queue = unique_queue("rmq_faults_storage")
    key = f"s_{queue}"
    runner, started, release = start_gated(env, queue, key)
    try:
        wait_for(started.exists, 120, "the workload to start")
        # SeaweedFS takes seconds to shut down gracefully; the outage starts when S3 stops answering
        stopper = threading.Thread(target=env.service_set.stop_seaweedfs)
        stopper.start()
        try:
            wait_for(lambda: not _port_open(env.services.s3_endpoint), 60, "S3 to stop answering", 0.05)
            down = time.monotonic()
            release.touch()  # the workload ends; its uploads meet the outage
            wait_for(lambda: _storage_retries(runner) > 0, 60, "an upload to meet the outage")
            time.sleep(max(0.0, down + outage - time.monotonic()))
        finally:
            stopper.join()
            env.service_set.start_seaweedfs()
        figures.outage_seconds = time.monotonic() - down
        settle(env, queue, [key], 180, figures)
    finally:
        runner.stop()
    count_log_figures([runner], figures)
    check_results(env, queue, [key], figures)
    if figures.storage_retries == 0:
        figures.problems.append("no upload retried: the outage missed the uploads")
    figures.seconds = time.monotonic() - began
    return figures


def _port_open(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((parts.hostname, parts.port)) == 0


def _storage_retries(runner: Runner) -> int:
    return sum(
        1
        for event in runner.events()
        if event.get("logger") == "studio_runner.storage" and "; retry " in event.get("msg", "")
    )


def poison_bodies(env: FaultEnv, key: str) -> list[bytes]:
    """Messages no runner can run, each of which once crashed the decoder or leaked a password."""
    host = env.services.s3_endpoint.split("://", 1)[1]
    good = client_request(env.services, env.bucket, key, "blobstore/none.tar")

    def variant(change: Callable[[dict[str, Any]], None]) -> bytes:
        body = json.loads(json.dumps(good))
        change(body)
        return json.dumps(body).encode()

    def stored_keys_not_text(body: dict[str, Any]) -> None:
        for artifact in body["experiment"]["artifacts"].values():
            del artifact["credentials"]
        body["config"]["storage"] = {"credentials": {"aws": {"access_key": 12345, "secret_access_key": "s"}}}

    return [
        variant(lambda b: b["experiment"]["resources_needed"].update(ram=1e999)),
        variant(lambda b: b["experiment"]["resources_needed"].update(hdd="9" * 400)),
        variant(stored_keys_not_text),
        variant(
            lambda b: b["experiment"]["artifacts"]["workspace"].update(
                qualified=f"ftp://AKIAEXAMPLE:poisonpassword@{host}/b/k.tar"
            )
        ),
        b'{"experiment": {"key": "deep", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        b'{"experiment": {"key": "big", "x": ' + b"1" * 5000 + b"}}",
        b"\xff\xfe not even text",
    ]


def poison_scenario(env: FaultEnv) -> Figures:
    """Poison messages ahead of real work: each is dead-lettered at once with its reason, and the
    requests behind them (two with megabyte fields that once hung a runner) still run."""
    queue = unique_queue("rmq_faults_poison")
    keys = [f"p{n}_{queue}" for n in range(3)]
    poison = poison_bodies(env, f"poison_{queue}")
    figures = Figures(scenario="poison messages ahead of work", published=len(keys))
    began = time.monotonic()
    publish_like_client(env.services.amqp_url, queue, poison, persistent=True)
    workspace_key = upload_blob(env.s3, env.bucket, workspace_tar({"train.py": WORKLOAD.encode()}))
    bodies = []
    for n, key in enumerate(keys):
        request = client_request(env.services, env.bucket, key, workspace_key, args=(key, "0", "0.2"))
        if n == 1:
            request["experiment"]["max_duration"] = "9" * 1_000_000  # ignored, as unparseable durations are
        if n == 2:
            request["experiment"]["pythonenv"] = [" " * 1_000_000 + "# only a comment"]
        bodies.append(json.dumps(request).encode())
    publish_like_client(env.services.amqp_url, queue, bodies, persistent=True)
    runner = env.start_runner(*runner_options(queue, "--max-attempts", "50"))
    dead: list[tuple[bytes, dict[str, Any]]] = []

    def all_dead_lettered() -> bool:
        dead.extend(dead_letters(env.services, queue))  # consumes them
        return len(dead) >= len(poison)

    try:
        try:
            wait_for(all_dead_lettered, 120, "every poison message to be dead-lettered", 0.5)
        except AssertionError as error:
            figures.problems.append(f"{error} ({len(dead)} of {len(poison)})")
        settle(env, queue, keys, 120, figures)
    finally:
        runner.stop()
    for _body, headers in dead:
        reason = str(headers.get("x-studio-reject-reason", ""))
        if not reason.startswith("invalid: ") or headers.get("x-studio-attempts") != 1:
            figures.problems.append(
                f"not refused at once: attempt {headers.get('x-studio-attempts')}: {reason[:200]}"
            )
        if "poisonpassword" in reason:
            figures.problems.append(f"a dead-letter reason quotes a password: {reason[:200]}")
    if "poisonpassword" in runner.log.read_text(errors="replace"):
        figures.problems.append("the runner's log quotes a password")
    count_log_figures([runner], figures)
    check_results(env, queue, keys, figures)  # the poison is drained: nothing more may be dead-lettered
    figures.dead_lettered = len(dead)
    figures.seconds = time.monotonic() - began
    return figures
