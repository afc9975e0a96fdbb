"""Progress reports on ``<queue>_response`` (spec §2.8), readable by upstream's consumers.

Each report is a ``dev.studio_go_runner.reports.Report`` (upstream ``proto/reports.proto``) in the
proto3 JSON mapping exactly as Go's ``protojson.Marshal`` wrote it: lowerCamelCase names
(``experimentId``, ``uniqueId``, ``executorId``), wrapper types as bare strings, Timestamps as
RFC 3339 UTC with 0/3/6/9 fraction digits, enums by name, zero values and empty maps left out.
It is sealed with the hybrid scheme of requests for the RSA key picked by the longest file-name
prefix of ``<queue>_response`` and published to ``StudioML.topic`` with routing key
``StudioML.<queue>_response``. No protobuf library is needed to write it.

Reports are best effort and never slow a job: they wait in a small buffer and a publisher thread,
which owns its own pika connection (pika is not thread-safe), sends them. When the buffer is full
new output lines are dropped; a few places stay reserved for the lifecycle reports.
"""

from __future__ import annotations

import contextvars
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from .envelope import RunnerKeyring, hybrid_seal
from .queues.base import RESPONSE_SUFFIX

log = logging.getLogger(__name__)

BUFFER_REPORTS = 64
"""Reports waiting to be published, as upstream's channel; more are dropped."""
RESERVED_FOR_LIFECYCLE = 4
"""Buffer places output lines may not take, so start/stop/Success still fit after a flood."""
CLOSE_WAIT_SECONDS = 10.0
RECONNECT_SECONDS = 5.0

# proto enums, by the names protojson writes (numbers as in reports.proto)
LOG_SEVERITY = {
    "Default": 0,
    "Trace": 100,
    "Debug": 200,
    "Info": 300,
    "Warning": 400,
    "Error": 500,
    "Fatal": 600,
}
TASK_STATE = {"Prestart": 0, "Started": 1, "Stopping": 2, "Failed": 20, "Success": 21}


def timestamp(ns: int | None = None) -> str:
    """A ``google.protobuf.Timestamp`` in proto3 JSON: ``2021-09-28T10:00:00.123456789Z``, trimmed to 0/3/6/9 digits."""
    ns = time.time_ns() if ns is None else ns
    seconds, nanos = divmod(ns, 1_000_000_000)
    text = datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    if nanos:
        fraction = f"{nanos:09d}"
        for digits in (3, 6):
            if fraction[digits:] == "0" * (9 - digits):
                fraction = fraction[:digits]
                break
        text += "." + fraction
    return text + "Z"


def report(
    payload: dict[str, Any],
    *,
    experiment_id: str | None = None,
    unique_id: str | None = None,
    executor_id: str | None = None,
    now: str | None = None,
) -> dict[str, Any]:
    """A ``Report``; ``payload`` is the oneof: ``{"logging": ...}``, ``{"progress": ...}`` or ``{"text": ...}``."""
    document: dict[str, Any] = {"time": now or timestamp()}
    for name, value in (
        ("experimentId", experiment_id),
        ("uniqueId", unique_id),
        ("executorId", executor_id),
    ):
        if value is not None:
            document[name] = value
    document.update(payload)
    return document


def log_entry(
    message: str, severity: str = "Info", fields: dict[str, str] | None = None, *, now: str | None = None
) -> dict[str, Any]:
    """The ``logging`` payload (``LogEntry``)."""
    if severity not in LOG_SEVERITY:
        raise ValueError(f"unknown LogSeverity {severity!r}")
    entry: dict[str, Any] = {"time": now or timestamp()}
    if LOG_SEVERITY[severity]:
        entry["severity"] = severity
    entry["message"] = message
    if fields:
        # protojson writes map entries sorted by key
        entry["fields"] = {str(k): str(v) for k, v in sorted(fields.items(), key=lambda kv: str(kv[0]))}
    return {"logging": entry}


def progress(
    state: str, *, error: dict[str, Any] | None = None, json_text: str | None = None, now: str | None = None
) -> dict[str, Any]:
    """The ``progress`` payload; ``error`` is ``Progress.Error`` (``{}`` is sent as upstream sent it on success)."""
    if state not in TASK_STATE:
        raise ValueError(f"unknown TaskState {state!r}")
    entry: dict[str, Any] = {"time": now or timestamp()}
    if json_text is not None:
        entry["json"] = json_text
    if TASK_STATE[state]:
        entry["state"] = state
    if error is not None:
        entry["error"] = error
    return {"progress": entry}


def progress_error(message: str = "", code: int = 0) -> dict[str, Any]:
    """``Progress.Error``: ``msg`` a StringValue (present when given), ``code`` an int32 (left out when 0)."""
    error: dict[str, Any] = {}
    if message:
        error["msg"] = message
    if code:
        error["code"] = max(-(2**31), min(2**31 - 1, int(code)))
    return error


def encode(document: dict[str, Any]) -> bytes:
    """The UTF-8 JSON of a report, as a proto3 JSON parser reads it."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")


class Reporter:
    """What an attempt tells its experimenter; this base sends nothing (no response queue or key)."""

    def started(self, unique_id: str | None = None) -> None:
        """The attempt begins: ``progress Started`` and ``logging Info "start"``."""

    def line(self, text: str) -> None:
        """One line of the experiment's console (``logging Info``)."""

    def stopped(self, success: bool, error: str = "", code: int | None = None) -> None:
        """The attempt ended, results uploaded: ``logging Info "stop"``, then ``progress Success`` or ``Failed``."""

    def close(self) -> None:
        """Send what is buffered (bounded wait) and release the connection."""


NO_REPORTS = Reporter()


class Sender(Protocol):
    """Delivers sealed reports to one response queue; created and used on the publisher thread only."""

    def send(self, body: bytes) -> None: ...

    def idle(self) -> None: ...

    def close(self) -> None: ...


class QueueReporter(Reporter):
    """Reports for one attempt, buffered and published by a thread of its own.

    The report sequence follows upstream: (``scanning queue`` on open) → ``Started`` → ``start``
    → one ``Info`` per console line → ``stop`` with ``success`` (and ``error``) → ``Success``.
    Upstream also meant to send ``Failed`` after a failed ``stop`` but never reached that code;
    here it is sent, so a consumer waiting for a terminal state is not left waiting. Output
    shares one pipe with stderr in this runner, so every console line is ``Info``.
    """

    def __init__(
        self,
        *,
        queue: str,
        experiment_id: str,
        seal: Callable[[bytes], str],
        open_sender: Callable[[], Sender],
        executor_id: str | None = None,
        capacity: int = BUFFER_REPORTS,
    ) -> None:
        self.queue = queue
        self.experiment_id = experiment_id
        self.executor_id = executor_id or socket.gethostname()
        self.unique_id: str | None = None
        self.dropped = 0
        self._seal = seal
        self._open_sender = open_sender
        self._capacity = max(capacity, RESERVED_FOR_LIFECYCLE + 1)
        self._pending: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._started = False
        self._stopped = False
        # in a copy of the creator's context, so the publisher's log lines keep the experiment and queue
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._publish,), name=f"reports {queue}", daemon=True
        )
        self._thread.start()
        self._put(
            report(log_entry("scanning queue", "Debug", {"queue_name": queue}), executor_id=self.executor_id),
            lifecycle=True,
        )

    # --- the runner's side -------------------------------------------------------------------
    def started(self, unique_id: str | None = None) -> None:
        with self._cond:
            if self._started:
                return
            self._started = True
            self.unique_id = unique_id
        self._put(self._report(progress("Started")), lifecycle=True)
        self._put(self._report(log_entry("start")), lifecycle=True)

    def line(self, text: str) -> None:
        self._put(self._report(log_entry(text)), lifecycle=False)

    def stopped(self, success: bool, error: str = "", code: int | None = None) -> None:
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
        fields = {"success": "True"} if success else {"error": error or "failed", "success": "False"}
        self._put(self._report(log_entry("stop", fields=fields)), lifecycle=True)
        if success:
            self._put(self._report(progress("Success", error={})), lifecycle=True)
        else:
            self._put(
                self._report(progress("Failed", error=progress_error(error or "failed", code or 0))),
                lifecycle=True,
            )

    def close(self) -> None:
        if self._started and not self._stopped:
            self.stopped(False, "the runner stopped handling the attempt before it ended")
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(CLOSE_WAIT_SECONDS)
        if self._thread.is_alive():
            log.warning(
                "reports to %s%s still unsent after %.0f s; leaving them",
                self.queue,
                RESPONSE_SUFFIX,
                CLOSE_WAIT_SECONDS,
            )
        if self.dropped:
            log.warning(
                "%d report(s) for %s dropped: the response queue %s%s could not keep up",
                self.dropped,
                self.experiment_id,
                self.queue,
                RESPONSE_SUFFIX,
            )

    def _report(self, payload: dict[str, Any]) -> dict[str, Any]:
        return report(
            payload, experiment_id=self.experiment_id, unique_id=self.unique_id, executor_id=self.executor_id
        )

    def _put(self, document: dict[str, Any], *, lifecycle: bool) -> None:
        with self._cond:
            limit = self._capacity if lifecycle else self._capacity - RESERVED_FOR_LIFECYCLE
            if self._closing or len(self._pending) >= limit:
                self.dropped += 1
                return
            self._pending.append(document)
            self._cond.notify_all()

    def _drop(self) -> None:
        with self._cond:
            self.dropped += 1

    # --- the publisher thread ----------------------------------------------------------------
    def _next(self, connected: bool) -> dict[str, Any] | None:
        """The next report; None after a quiet second (time to service the connection) or when done."""
        with self._cond:
            if not self._pending and not self._closing:
                self._cond.wait(timeout=1.0 if connected else None)
            return self._pending.popleft() if self._pending else None

    def _done(self) -> bool:
        with self._cond:
            return self._closing and not self._pending

    def _publish(self) -> None:
        sender: Sender | None = None
        retry_at = 0.0
        try:
            while not self._done():
                document = self._next(sender is not None)
                if document is None:
                    if sender is not None:
                        sender = self._attempt(sender, sender.idle)
                    continue
                if sender is None and time.monotonic() >= retry_at:
                    try:
                        sender = self._open_sender()
                    except Exception as error:
                        log.warning(
                            "cannot open the response queue %s%s: %s", self.queue, RESPONSE_SUFFIX, error
                        )
                        retry_at = time.monotonic() + RECONNECT_SECONDS
                if sender is None:
                    self._drop()
                    continue
                try:
                    body = self._seal(encode(document)).encode("ascii")
                except Exception:
                    log.exception("sealing a report for %s failed; it is dropped", self.queue)
                    self._drop()
                    continue
                sender = self._attempt(sender, lambda s=sender, b=body: s.send(b))
                if sender is None:
                    self._drop()
                    retry_at = time.monotonic() + RECONNECT_SECONDS
        finally:
            if sender is not None:
                self._attempt(sender, sender.close)

    def _attempt(self, sender: Sender, operation: Callable[[], None]) -> Sender | None:
        """Run a sender operation; on failure close the sender and return None (reconnect later)."""
        try:
            operation()
            return sender
        except Exception as error:
            log.warning("publishing a report to %s%s failed: %s", self.queue, RESPONSE_SUFFIX, error)
            try:
                sender.close()
            except Exception:
                log.debug("closing a failed report sender", exc_info=True)
            return None


class RabbitMQSender:
    """A pika connection owned by the publisher thread, sending to ``StudioML.<queue>_response``."""

    def __init__(self, transport: Any, response_queue: str) -> None:
        import pika  # imported here: runs without RabbitMQ never load it

        from .queues.rabbitmq import EXCHANGE, routing_key

        self._exchange = EXCHANGE
        self._routing_key = routing_key(response_queue)
        self._connection = transport.connect(f"reports {response_queue}")
        try:
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
        except Exception:
            self.close()
            raise
        self._properties = pika.BasicProperties(content_type="text/plain")

    def send(self, body: bytes) -> None:
        # mandatory: a deleted response queue raises UnroutableError instead of losing silently
        self._channel.basic_publish(self._exchange, self._routing_key, body, self._properties, mandatory=True)

    def idle(self) -> None:
        self._connection.process_data_events(time_limit=0)

    def close(self) -> None:
        if self._connection.is_open:
            self._connection.close()


class ResponseQueues:
    """Opens a ``Reporter`` for a request: real when ``<queue>_response`` exists and a key is found."""

    def __init__(
        self,
        keys: RunnerKeyring,
        *,
        exists: Callable[[str], bool],
        open_sender: Callable[[str], Sender],
        executor_id: str | None = None,
    ) -> None:
        self.keys = keys
        self._exists = exists
        self._open_sender = open_sender
        self.executor_id = executor_id or socket.gethostname()

    @classmethod
    def rabbitmq(cls, transport: Any, keys: RunnerKeyring) -> ResponseQueues:
        """Response queues on the broker of a ``RabbitMQTransport`` (the only transport upstream reported on)."""
        return cls(
            keys,
            exists=transport.exists,
            open_sender=lambda response_queue: RabbitMQSender(transport, response_queue),
        )

    def open(self, queue: str, experiment_id: str) -> Reporter:
        response_queue = queue + RESPONSE_SUFFIX
        try:
            if not self._exists(response_queue):
                return NO_REPORTS
        except Exception as error:
            log.warning(
                "cannot tell whether %s exists (%s); no reports for this attempt", response_queue, error
            )
            return NO_REPORTS
        key: RSAPublicKey | None = self.keys.response_key(response_queue)
        if key is None:
            log.warning(
                "%s exists but %s has no key for it (a file named with a prefix of %r); no reports sent",
                response_queue,
                self.keys.response_signatures_dir,
                response_queue,
            )
            return NO_REPORTS
        return QueueReporter(
            queue=queue,
            experiment_id=experiment_id,
            seal=lambda data: hybrid_seal(data, key),
            open_sender=lambda: self._open_sender(response_queue),
            executor_id=self.executor_id,
        )
