"""``studio-runner``: ``serve`` drains StudioML queues, ``run`` runs exactly one request.

Every option can also come from the environment under its upper-case name with dashes as
underscores (``--amqp-url`` ↔ ``AMQP_URL``), as the upstream runner's options did, so a
Kubernetes ConfigMap can configure the runner without touching its command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import logs
from .amqp_urls import with_password
from .archive import missing_extraction_filters
from .cache import DownloadCache
from .envcache import EnvPackCache
from .envelope import RunnerKeyring, open_message
from .experiment import ExperimentRunner
from .gpus import inventory, parse_slot_overrides, visible_devices_from_env
from .jobenv import hide_runner_process
from .outcome import EXIT_CODES, Outcome, Status
from .pythonenv import VirtualenvCache
from .request import RequestError
from .resources import ResourcePool
from .storage import Storage, StorageSettings
from .summary import RunSummary, ServeSummary
from .units import parse_seconds, parse_size

if TYPE_CHECKING:
    from .health import HealthServer
    from .metrics import RunnerMetrics
    from .reports import ResponseQueues
    from .service import Service

log = logging.getLogger("studio_runner")

_TRUE = {"1", "true", "yes", "on"}
FLAG = bool
"""Marks an on/off option (``--debug`` / ``--no-debug``)."""


def _names(text: str) -> tuple[str, ...]:
    return tuple(name for name in text.replace(",", " ").split() if name)


DEFAULT_PROM_ADDRESS = ":9090"
"""Upstream's port. Taken when free: a busy default port is a warning, a busy chosen one an error."""
_DEFAULT_ROOT = Path(os.environ.get("TMPDIR") or tempfile.gettempdir()) / "studio-runner"

# (option, type, default, help): the option's environment variable is its upper-case name.
EXPERIMENT_OPTIONS: tuple[tuple[str, Any, Any, str], ...] = (
    ("--working-dir", Path, _DEFAULT_ROOT, "folder for experiment attempts"),
    ("--cache-dir", Path, None, "download and virtualenv caches (default: <working-dir>/cache)"),
    ("--cache-size", parse_size, 10 * 1024**3, "download cache size, e.g. 20GiB"),
    ("--max-cores", int, 0, "cores offered to experiments (0: all)"),
    ("--max-mem", parse_size, 0, "RAM offered to experiments (0: all)"),
    ("--max-disk", parse_size, 0, "disk offered to experiments (0: 85%% of free space)"),
    ("--cpu-only", FLAG, False, "refuse GPU work even when GPUs are present"),
    ("--gpu-slots", _names, (), "slots per GPU model the built-in table lacks, e.g. 'H100=80'"),
    ("--job-env", _names, (), "runner environment variables passed on to workloads"),
    ("--installer", str, "auto", "virtualenv installer: 'pip', 'uv', or 'auto' (uv when installed)"),
    ("--env-cache-uri", str, None, "s3://host:port/bucket/prefix where built virtualenvs are shared, packed"),
    (
        "--env-cache-dir",
        Path,
        None,
        "node-local folder of packed virtualenvs, consulted before --env-cache-uri",
    ),
    ("--env-cache-dir-size", parse_size, 20 * 1024**3, "bound of --env-cache-dir (least recently used out)"),
    ("--grace-period", parse_seconds, 30.0, "how long a stopping workload gets before SIGKILL"),
    ("--schema-logs", FLAG, True, "record plain console lines in the scrape document"),
    ("--s3-https", FLAG, False, "use HTTPS for non-AWS s3://host:port endpoints"),
    ("--s3-ca", str, None, "CA bundle for HTTPS object stores"),
    ("--debug", FLAG, False, "keep experiment folders and log at debug level"),
    ("--log-format", str, "json", "'json' (one event per line) or 'text'"),
)
MESSAGE_KEY_OPTIONS: tuple[tuple[str, Any, Any, str], ...] = (
    ("--encrypt-dir", Path, None, "folder with encryption/ssh-privatekey (RSA) and passphrase/"),
    ("--request-signatures-dir", Path, None, "signers' ssh-ed25519 keys, files named by queue prefix"),
    ("--clear-text-messages", FLAG, False, "with --encrypt-dir, also take clear-text requests"),
)
"""Encrypted and signed requests (spec §6): ``serve`` and ``run`` both open them."""
SERVE_OPTIONS: tuple[tuple[str, Any, Any, str], ...] = (
    ("--amqp-url", str, None, "RabbitMQ URL, e.g. amqp://user:password@host:5672/%%2f"),
    ("--amqp-password", str, None, "password for the --amqp-url user, kept out of the URL (a Secret)"),
    ("--amqp-mgt-url", str, None, "RabbitMQ management URL (default: AMQP port + 10000)"),
    ("--queue-match", str, r"^(rmq|sqs|local)_.*$", "regular expression a queue name must match"),
    ("--queue-mismatch", str, None, "regular expression a queue name must not match"),
    ("--queue-root", Path, None, "folder whose sub-folders are local_ queues"),
    ("--sqs-certs", Path, None, "folder of AWS credential sets, one sub-folder each"),
    ("--sqs-endpoint", str, None, "SQS endpoint URL (for SQS-compatible servers)"),
    ("--sqs-region", str, None, "SQS region when no credential set names one"),
    (
        "--sqs-visibility-ceiling",
        parse_seconds,
        12 * 3600.0,
        "SQS's limit on a message's invisibility after receipt (12h on AWS; lower only for tests)",
    ),
    ("--max-attempts", int, 3, "attempts before a failing experiment is dead-lettered"),
    ("--limit-tasks", int, 0, "exit after this many experiments (0: no limit)"),
    ("--limit-idle-duration", parse_seconds, 0.0, "exit after this long without work (0: never)"),
    ("--prom-address", str, DEFAULT_PROM_ADDRESS, "[HOST]:PORT of /metrics /healthz /readyz ('', off: none)"),
    ("--state-file", Path, None, "mounted ConfigMap folder or file whose STATE drains the runner"),
    *MESSAGE_KEY_OPTIONS,
    ("--response-signatures-dir", Path, None, "RSA keys for <queue>_response reports, by queue prefix"),
    ("--result-file", Path, None, "where to write the JSON summary of what was handled, on exit"),
)
RUN_OPTIONS: tuple[tuple[str, Any, Any, str], ...] = (
    ("--request", str, None, "request file, or '-' for standard input"),
    ("--request-json", str, None, "the request itself, as JSON (for a pod's environment)"),
    ("--result-file", Path, None, "where to write the JSON result summary"),
    *MESSAGE_KEY_OPTIONS,
)


def _add_options(group: argparse._ArgumentGroup, options: tuple[tuple[str, Any, Any, str], ...]) -> None:
    """Each option with its environment variable as the default, named in the help."""
    for option, kind, default, text in options:
        env = option.lstrip("-").upper().replace("-", "_")
        raw = os.environ.get(env)
        if kind is FLAG:
            value = raw.strip().lower() in _TRUE if raw is not None else default
            group.add_argument(
                option, action=argparse.BooleanOptionalAction, default=value, help=f"{text} [{env}]"
            )
        else:
            try:
                value = kind(raw) if raw not in (None, "") else default
            except ValueError as error:
                raise SystemExit(
                    f"studio-runner: error: environment variable {env}={raw!r}: {error}"
                ) from None
            group.add_argument(option, type=kind, default=value, help=f"{text} [{env}]")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _add_options(common.add_argument_group("experiments"), EXPERIMENT_OPTIONS)
    parser = argparse.ArgumentParser(prog="studio-runner", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", parents=[common], help="take experiments from queues until stopped")
    _add_options(serve.add_argument_group("queues"), SERVE_OPTIONS)
    run = commands.add_parser("run", parents=[common], help="run one request and exit with its status")
    _add_options(run.add_argument_group("request"), RUN_OPTIONS)
    return parser


def main(argv: list[str] | None = None) -> int:
    unsupported = missing_extraction_filters()  # before anything else: no folder, no log, no work
    if unsupported:
        print(f"studio-runner: error: {unsupported}", file=sys.stderr)
        return EXIT_CODES[Status.INFRASTRUCTURE]
    args = build_parser().parse_args(argv)
    logs.configure(fmt=args.log_format, debug=args.debug)
    hide_runner_process()  # before any workload starts: they run as this user
    try:
        if args.command == "run":
            return _run(args)
        return _serve(args)
    except _UsageError as error:
        print(f"studio-runner: error: {error}", file=sys.stderr)
        return EXIT_CODES[Status.INVALID]


class _UsageError(Exception):
    """Bad options or configuration: said plainly, no traceback."""


def _runner(args: argparse.Namespace, *, serve: bool) -> ExperimentRunner:
    working_dir: Path = args.working_dir
    cache_dir: Path = args.cache_dir or working_dir / "cache"
    try:
        working_dir.mkdir(parents=True, exist_ok=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _UsageError(f"cannot create {error.filename}: {error.strerror}") from None
    gpus = (
        [] if args.cpu_only else inventory(visible_devices_from_env(), parse_slot_overrides(args.gpu_slots))
    )
    try:
        pool = ResourcePool.from_host(
            max_cores=args.max_cores,
            max_mem=args.max_mem,
            max_disk=args.max_disk,
            working_dir=working_dir,
            cpu_only=args.cpu_only or not gpus,
            gpus=gpus,
        )
    except ValueError as error:
        raise _UsageError(str(error)) from None
    settings = StorageSettings(
        https=args.s3_https,
        ca_bundle=args.s3_ca,
        default_region=os.environ.get("AWS_DEFAULT_REGION") or StorageSettings.default_region,
    )
    storage = Storage(settings)
    return ExperimentRunner(
        working_dir=working_dir,
        storage=storage,
        venvs=VirtualenvCache(
            cache_dir / "venvs",
            passthrough=args.job_env,
            uv=_uv(args.installer),
            packs=_env_packs(args, Storage(dataclasses.replace(settings, **ENV_CACHE_STORAGE)), cache_dir),
        ),
        resources=pool,
        cache=DownloadCache(cache_dir / "downloads", args.cache_size),
        schema_logs=args.schema_logs,
        keep_workdirs=args.debug,
        env_passthrough=args.job_env,
        grace_seconds=args.grace_period,
        retval_refresh_seconds=5.0 if serve else None,
        on_line=None if serve else _print_line,
    )


ENV_CACHE_STORAGE = {"outage_seconds": 20.0, "connect_timeout": 5.0}
"""The environment cache only saves time: when its store is away, build after 20 s rather than
ride out the 5 min outage allowance that results and artifacts get."""


def _env_packs(args: argparse.Namespace, storage: Storage, cache_dir: Path) -> EnvPackCache | None:
    """The shared cache of packed virtualenvs, when an option asks for one."""
    if not args.env_cache_uri and args.env_cache_dir is None:
        return None
    try:
        packs = EnvPackCache(
            storage=storage,
            uri=args.env_cache_uri or None,
            local_dir=args.env_cache_dir,
            scratch_dir=cache_dir / "envpacks",
            local_max_bytes=args.env_cache_dir_size,
        )
    except ValueError as error:
        raise _UsageError(f"--env-cache-uri: {error}") from None
    except OSError as error:
        raise _UsageError(f"--env-cache-dir: cannot create {error.filename}: {error.strerror}") from None
    log.info("packed virtualenvs shared through %s", packs.describe())
    return packs


def _uv(installer: str) -> Path | None:
    """The uv binary to build virtualenvs with, or None for pip."""
    if installer == "pip":
        return None
    beside = Path(sys.executable).parent / "uv"
    found = beside if beside.exists() else shutil.which("uv")
    if installer == "uv" and found is None:
        raise _UsageError("--installer uv: no uv binary beside the runner or on PATH (pip install uv)")
    if installer not in ("auto", "uv"):
        raise _UsageError(f"--installer must be 'auto', 'pip' or 'uv', not {installer!r}")
    return Path(found) if found else None


def _print_line(line: str) -> None:
    """``run`` mode: the experiment's console goes to stdout, where pod and task logs read it."""
    sys.stdout.write(line if line.endswith("\n") else line + "\n")
    sys.stdout.flush()


def _message_keys(args: argparse.Namespace) -> RunnerKeyring | None:
    """The key folders given, checked once at start so a broken setup fails before taking work."""
    try:
        keys = RunnerKeyring.from_options(
            args.encrypt_dir, args.request_signatures_dir, getattr(args, "response_signatures_dir", None)
        )
    except ValueError as error:
        raise _UsageError(str(error)) from None
    if keys is not None:
        if not keys.decrypts:
            taking = "clear-text requests only"
        elif args.clear_text_messages:
            taking = "encrypted and clear-text requests"
        else:
            taking = "encrypted requests only"
        log.info("message keys: %s; taking %s", keys.describe(), taking)
    return keys


# --- run ----------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    body = _read_request(args)
    keys = _message_keys(args)
    try:
        # no queue here: a signature from any trusted signer is accepted
        request = open_message(body, None, keys, clear_text_allowed=args.clear_text_messages)
    except RequestError as error:
        outcome = Outcome(Status.INVALID, reason=str(error))
    else:
        runner = _runner(args, serve=False)
        cancel = threading.Event()
        _on_stop_signals(lambda: cancel.set())
        with logs.bound(experiment=request.key):
            log.info("running experiment %s", request.key)
            outcome = runner.run(request, cancel=cancel)
    log.log(
        logging.INFO if outcome.status is Status.SUCCEEDED else logging.ERROR,
        "experiment %s %s%s",
        outcome.key or "?",
        outcome.status.value,
        f": {outcome.reason}" if outcome.reason else "",
    )
    if args.result_file is not None:
        RunSummary.from_outcome(outcome).write(args.result_file)
    return outcome.process_exit_code


def _read_request(args: argparse.Namespace) -> bytes:
    if args.request_json:
        return args.request_json.encode()
    if args.request in (None, ""):
        raise _UsageError("give the request with --request FILE, --request - (stdin) or --request-json")
    if args.request == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(args.request).read_bytes()
    except OSError as error:
        raise _UsageError(f"cannot read request file {args.request}: {error.strerror}") from None


def _on_stop_signals(stop: Callable[[], None]) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


# --- serve --------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    from .drain import StateWatcher
    from .handling import MessageHandler
    from .limits import HARD_CAP_SECONDS
    from .metrics import RunnerMetrics
    from .queues.localdir import LocalDirTransport
    from .queues.rabbitmq import RabbitMQTransport, consumer_timeout_ms
    from .queues.sqs import SqsTransport
    from .service import QueueMatcher, Service

    transports = []
    if args.amqp_url:
        amqp_url = _with_password(args.amqp_url, args.amqp_password) if args.amqp_password else args.amqp_url
        # a consumer's timeout is fixed before its message is seen: cover the longest run any
        # request can have here (the hard cap), its stopping grace and its final upload
        timeout = consumer_timeout_ms(HARD_CAP_SECONDS, args.grace_period, FINAL_UPLOAD_SECONDS)
        transports.append(RabbitMQTransport(amqp_url, args.amqp_mgt_url, consumer_timeout_ms=timeout))
    if args.sqs_certs or args.sqs_endpoint:
        transports.append(
            SqsTransport(
                certs_dir=args.sqs_certs,
                endpoint_url=args.sqs_endpoint,
                region=args.sqs_region,
                visibility_ceiling=args.sqs_visibility_ceiling,
            )
        )
    if args.queue_root:
        transports.append(LocalDirTransport(args.queue_root))
    if not transports:
        raise _UsageError("no queues to serve: give --amqp-url, --sqs-certs/--sqs-endpoint or --queue-root")
    keys = _message_keys(args)
    responses = _response_queues(transports, keys)
    runner = _runner(args, serve=True)
    metrics = RunnerMetrics(runner.host)
    metrics.watch_resources(runner.resources)
    if runner.cache is not None:
        metrics.watch_cache(runner.cache)
    handler = MessageHandler(
        runner, metrics, keys=keys, clear_text_allowed=args.clear_text_messages, responses=responses
    )
    service = Service(
        transports,
        QueueMatcher(args.queue_match, args.queue_mismatch),
        handler,
        max_attempts=args.max_attempts,
        limit_tasks=args.limit_tasks,
        limit_idle_seconds=args.limit_idle_duration,
        capacity=handler.fits,
        metrics=metrics,
    )
    _on_stop_signals(_stopper(service, args.grace_period))
    health = _health_server(args.prom_address, metrics, service)
    watcher = StateWatcher(args.state_file, service).start() if args.state_file else None
    log.info("serving %s", ", ".join(t.describe() for t in transports))
    try:
        summary = service.run()
    finally:
        if watcher is not None:
            watcher.close()
        if health is not None:
            health.close()
    runner.finish_late_refreshes(timeout=args.grace_period)
    for transport in transports:
        transport.close()
    log.info("stopped (%s): %s", summary.ended_by, summary.statuses)
    if args.result_file is not None:
        ServeSummary(
            ended_by=summary.ended_by,
            handled=summary.handled,
            statuses=summary.statuses,
            settle_failures=summary.settle_failures,
            abandoned=summary.abandoned,
            lost_acks=summary.lost_acks,
            experiments=handler.recent(),
        ).write(args.result_file)
    return 0


def _with_password(amqp_url: str, password: str) -> str:
    try:
        return with_password(amqp_url, password)
    except ValueError as error:
        raise _UsageError(f"--amqp-password: {error}") from None


def _response_queues(transports: list[Any], keys: RunnerKeyring | None) -> ResponseQueues | None:
    """Reports go to ``<queue>_response`` on the RabbitMQ broker, when response keys are given (spec §2.8)."""
    from .reports import ResponseQueues

    if keys is None or keys.response_signatures_dir is None:
        return None
    rabbitmq = next((t for t in transports if t.kind == "rmq"), None)
    if rabbitmq is None:
        log.warning("--response-signatures-dir is set but reports need RabbitMQ (--amqp-url); none are sent")
        return None
    return ResponseQueues.rabbitmq(rabbitmq, keys)


FINAL_UPLOAD_SECONDS = 60.0
"""After SIGTERM the workload gets ``--grace-period``, then its results this long to upload before
the message is given back regardless. A pod's terminationGracePeriodSeconds should cover both."""


def _stopper(service: Service, grace_seconds: float) -> Callable[[], None]:
    """First SIGTERM/SIGINT: stop taking work, stop the workload, save and requeue. Second: requeue now."""
    signals = 0

    def stop() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            service.stop(grace_seconds + FINAL_UPLOAD_SECONDS, wait=False)
        else:
            log.warning("second stop signal: giving running work back to its queue now")
            service.stop(0.0, wait=False)

    return stop


def _health_server(address: str, metrics: RunnerMetrics, service: Service) -> HealthServer | None:
    from .health import HealthServer

    if address.strip().lower() in ("", "off", "none"):
        return None
    try:
        return HealthServer(address, metrics.registry, service).start()
    except ValueError as error:
        raise _UsageError(str(error)) from None
    except OSError as error:
        problem = f"--prom-address {address}: cannot listen ({error.strerror or error})"
        if address == DEFAULT_PROM_ADDRESS:  # e.g. a second runner on one host: it still runs
            log.warning("%s; no metrics or health endpoints (choose a port with --prom-address)", problem)
            return None
        raise _UsageError(problem) from None


if __name__ == "__main__":
    sys.exit(main())
