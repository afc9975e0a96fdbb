"""AWS SQS queues (spec §2.3), with boto3: one transport for every credential set in ``--sqs-certs``.

A received message stays ours only while its visibility timeout runs, so ``hold_until``
keeps pushing it out (every half timeout, more often after a failure) while work runs. boto3
clients are thread-safe, so unlike RabbitMQ any thread may hold or settle an SQS delivery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .base import Delivery, DeliveryLost, QueueError, Transport, dead_letter_queue, utc_now_text

log = logging.getLogger(__name__)

QUEUE_PREFIX = "sqs_"
ATTEMPTS_ATTRIBUTE = "studio_attempts"
LAST_FAILURE_ATTRIBUTE = "studio_last_failure"
REASON_ATTRIBUTE = "studio_reject_reason"
REJECTED_QUEUE_ATTRIBUTE = "studio_rejected_queue"
REJECTED_AT_ATTRIBUTE = "studio_rejected_at"
MAX_MESSAGE_ATTRIBUTES = 10
"""SQS refuses a message with more; ours win, the sender's are trimmed."""

VISIBILITY_TIMEOUT = 30
MAX_WAIT_SECONDS = 20
"""SQS's longest ``WaitTimeSeconds`` for a long poll."""
VISIBILITY_CEILING_SECONDS = 12 * 3600.0
"""SQS caps a message's total invisibility at 12 h after its receipt: a longer run loses its claim."""
HOLD_MARGIN_SECONDS = 600.0
MAX_HOLD_SECONDS = VISIBILITY_CEILING_SECONDS - HOLD_MARGIN_SECONDS
"""Stop extending before the broker refuses (the last extension still ends at the ceiling)."""
DEFAULT_REGION = "us-west-2"
_MISSING_QUEUE = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}


@dataclass(frozen=True)
class _Account:
    """One credential set (a sub-directory of ``--sqs-certs``, or the default chain)."""

    name: str
    client: Any
    fingerprint: tuple[int, ...]


@dataclass(frozen=True)
class _Route:
    account: _Account
    url: str


class SqsTransport(Transport):
    """Every ``sqs_`` queue of every credential set; a name found in several accounts is served from each in turn."""

    kind = "sqs"
    waits_for_messages = True

    def __init__(
        self,
        *,
        certs_dir: Path | str | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        visibility_timeout: int = VISIBILITY_TIMEOUT,
        wait_seconds: int = 1,
        max_hold_seconds: float | None = None,
        visibility_ceiling: float = VISIBILITY_CEILING_SECONDS,
    ) -> None:
        """``visibility_ceiling``: how long after its receipt SQS lets a message stay invisible
        (12 h on AWS); lower only to see a run outlast it in a test. Extensions never pass it."""
        if visibility_ceiling <= 0:
            raise ValueError(f"the SQS visibility ceiling must be positive, not {visibility_ceiling}")
        self.certs_dir = Path(certs_dir) if certs_dir is not None else None
        self.endpoint_url = endpoint_url
        self.region = region
        self.visibility_timeout = visibility_timeout
        self.wait_seconds = wait_seconds
        self.visibility_ceiling = visibility_ceiling
        self.max_hold_seconds = (
            max_hold_seconds
            if max_hold_seconds is not None
            else visibility_ceiling - min(HOLD_MARGIN_SECONDS, visibility_ceiling / 12)
        )
        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}
        self._routes: dict[str, list[_Route]] = {}
        self._turn: dict[str, int] = {}
        self._client_config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=wait_seconds + 20,
            max_pool_connections=64,  # one client serves every queue worker thread
        )

    def describe(self) -> str:
        where = f"credential sets in {self.certs_dir}" if self.certs_dir else "default credentials"
        return f"sqs {where}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    # --- accounts -------------------------------------------------------------------------------
    def _scan_accounts(self) -> list[_Account]:
        """Re-read ``--sqs-certs`` (credentials may be added, rotated or removed while we run)."""
        if self.certs_dir is None:
            with self._lock:
                if "default" not in self._accounts:
                    self._accounts["default"] = self._make_account("default", boto3.Session(), ())
                return [self._accounts["default"]]
        try:
            folders = sorted(p for p in self.certs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError as error:
            raise QueueError(f"cannot read --sqs-certs {self.certs_dir}: {error}") from error
        accounts: dict[str, _Account] = {}
        for folder in folders:
            credentials, config = folder / "credentials", folder / "config"
            try:
                fingerprint = (credentials.stat().st_mtime_ns, config.stat().st_mtime_ns)
            except OSError:
                log.warning(
                    "skipping %s: a credential set needs both a 'credentials' and a 'config' file", folder
                )
                continue
            known = self._accounts.get(folder.name)
            if known is not None and known.fingerprint == fingerprint:
                accounts[folder.name] = known
                continue
            session = botocore.session.Session()
            # an explicit profile makes botocore prefer these files to AWS_* environment variables
            session.set_config_variable("credentials_file", str(credentials))
            session.set_config_variable("config_file", str(config))
            session.set_config_variable("profile", "default")
            profile_region = session.full_config.get("profiles", {}).get("default", {}).get("region")
            accounts[folder.name] = self._make_account(
                folder.name, boto3.Session(botocore_session=session), fingerprint, profile_region
            )
        with self._lock:
            self._accounts = accounts
        return list(accounts.values())

    def _make_account(
        self, name: str, session: boto3.Session, fingerprint: tuple[int, ...], region: str | None = None
    ) -> _Account:
        region = region or self.region or session.region_name or DEFAULT_REGION
        client = session.client(
            "sqs", region_name=region, endpoint_url=self.endpoint_url, config=self._client_config
        )
        return _Account(name=name, client=client, fingerprint=fingerprint)

    # --- Transport ------------------------------------------------------------------------------
    def discover(self) -> list[str]:
        routes: dict[str, list[_Route]] = {}
        failures: list[str] = []
        accounts = self._scan_accounts()
        for account in accounts:
            try:
                for page in account.client.get_paginator("list_queues").paginate(
                    QueueNamePrefix=QUEUE_PREFIX
                ):
                    for url in page.get("QueueUrls", []):
                        routes.setdefault(url.rstrip("/").rsplit("/", 1)[-1], []).append(_Route(account, url))
            except (ClientError, BotoCoreError) as error:
                failures.append(f"{account.name}: {error}")
                log.warning("listing SQS queues with credential set %s failed: %s", account.name, error)
        if accounts and len(failures) == len(accounts):
            raise QueueError("listing SQS queues failed for every credential set: " + "; ".join(failures))
        with self._lock:
            self._routes = routes
        return sorted(routes)

    def exists(self, queue: str) -> bool:
        return bool(self._resolve(queue, refresh=True))

    def get(
        self, queue: str, wait: float | None = None, stop: Callable[[], bool] | None = None
    ) -> SqsDelivery | None:
        """Long-poll each credential set's copy of ``queue`` in turn for ``wait`` seconds (whole
        seconds, at most SQS's 20; None: ``wait_seconds``); SQS answers the moment a message lands."""
        routes = self._resolve(queue)
        if not routes:
            return None
        seconds = self.wait_seconds if wait is None else min(MAX_WAIT_SECONDS, max(0, round(wait)))
        with self._lock:
            turn = self._turn.get(queue, 0)
            self._turn[queue] = turn + 1
        for route in routes[turn % len(routes) :] + routes[: turn % len(routes)]:
            delivery = self._receive(queue, route, seconds)
            if delivery is not None or (stop is not None and stop()):
                return delivery
        return None

    def _receive(self, queue: str, route: _Route, wait_seconds: int) -> SqsDelivery | None:
        try:
            answer = route.account.client.receive_message(
                QueueUrl=route.url,
                MaxNumberOfMessages=1,
                VisibilityTimeout=self.visibility_for(0.0),
                WaitTimeSeconds=wait_seconds,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["ApproximateReceiveCount"],
            )
        except ClientError as error:
            if _error_code(error) in _MISSING_QUEUE:
                self._forget(queue, route)
                return None
            raise QueueError(
                f"receiving from SQS queue {queue} ({route.account.name}) failed: {error}"
            ) from error
        except BotoCoreError as error:
            raise QueueError(
                f"receiving from SQS queue {queue} ({route.account.name}) failed: {error}"
            ) from error
        messages = answer.get("Messages") or []
        return SqsDelivery(self, queue, route, messages[0]) if messages else None

    def _resolve(self, queue: str, *, refresh: bool = False) -> list[_Route]:
        """Where ``queue`` lives; looked up directly for names discovery has not seen."""
        with self._lock:
            routes = None if refresh else self._routes.get(queue)
            accounts = list(self._accounts.values())
        if routes is not None:
            return routes
        if not accounts:
            accounts = self._scan_accounts()
        found = []
        for account in accounts:
            try:
                found.append(_Route(account, account.client.get_queue_url(QueueName=queue)["QueueUrl"]))
            except ClientError as error:
                if _error_code(error) not in _MISSING_QUEUE:
                    raise QueueError(
                        f"looking up SQS queue {queue} ({account.name}) failed: {error}"
                    ) from error
            except BotoCoreError as error:
                raise QueueError(f"looking up SQS queue {queue} ({account.name}) failed: {error}") from error
        with self._lock:
            if found:
                self._routes[queue] = found
            else:
                self._routes.pop(queue, None)
        return found

    def _forget(self, queue: str, route: _Route) -> None:
        with self._lock:
            remaining = [r for r in self._routes.get(queue, []) if r != route]
            if remaining:
                self._routes[queue] = remaining
            else:
                self._routes.pop(queue, None)

    def visibility_for(self, held: float) -> int:
        """The visibility timeout to set after holding a message ``held`` seconds: the usual step,
        cut so the message never stays invisible past the ceiling (SQS refuses that)."""
        return max(0, int(min(self.visibility_timeout, self.visibility_ceiling - held)))

    def dead_letter_url(self, route: _Route, queue: str) -> str:
        """``<queue>_rejected`` in the same account, created on first use."""
        name = dead_letter_queue(queue)
        client = route.account.client
        try:
            return client.get_queue_url(QueueName=name)["QueueUrl"]
        except ClientError as error:
            if _error_code(error) not in _MISSING_QUEUE:
                raise
        log.info("creating the dead-letter queue %s (%s)", name, route.account.name)
        return client.create_queue(QueueName=name)["QueueUrl"]


class SqsDelivery(Delivery):
    """A received message, ours while its visibility timeout lasts."""

    def __init__(self, transport: SqsTransport, queue: str, route: _Route, message: dict[str, Any]) -> None:
        attributes: dict[str, dict[str, Any]] = message.get("MessageAttributes") or {}
        receive_count = int((message.get("Attributes") or {}).get("ApproximateReceiveCount", "1"))
        headers = {
            name: value.get("StringValue", value.get("BinaryValue")) for name, value in attributes.items()
        }
        super().__init__(
            queue,
            message["Body"].encode(),
            attempts=_as_int(headers.get(ATTEMPTS_ATTRIBUTE), 1),
            redelivered=receive_count > 1,
            headers=headers,
        )
        self.message_id: str = message.get("MessageId", "")
        self._transport = transport
        self._route = route
        self._client = route.account.client
        self._body_text: str = message["Body"]
        self._attributes = attributes
        self._receipt = message["ReceiptHandle"]
        self._received = time.monotonic()

    def hold_until(self, done: threading.Event) -> None:
        """Extend visibility every half timeout; halve the interval after a failure; stop at the ceiling."""
        timeout = self._transport.visibility_timeout
        normal = timeout / 2
        shortest = max(timeout / 6, 0.5)
        interval = normal
        while not done.wait(interval):
            held = time.monotonic() - self._received
            if held >= self._transport.max_hold_seconds:
                log.error(
                    "a message from %s has been held for %.0f s, at SQS's visibility ceiling (%.0f s): it "
                    "becomes visible to other runners again. This run goes on and stores its results; "
                    "a copy taken meanwhile waits for it (its lease) and is then deleted as already done",
                    self.queue,
                    held,
                    self._transport.visibility_ceiling,
                )
                done.wait()
                return
            try:
                self._client.change_message_visibility(
                    QueueUrl=self._route.url,
                    ReceiptHandle=self._receipt,
                    VisibilityTimeout=self._transport.visibility_for(held),
                )
                interval = normal
            except (ClientError, BotoCoreError) as error:
                interval = max(interval / 2, shortest)
                log.warning(
                    "extending visibility of a message from %s failed (%s); next try in %.1f s",
                    self.queue,
                    error,
                    interval,
                )

    def _ack(self) -> None:
        self._call("ack", self._client.delete_message, QueueUrl=self._route.url, ReceiptHandle=self._receipt)

    def _requeue(self) -> None:
        self._call(
            "requeue",
            self._client.change_message_visibility,
            QueueUrl=self._route.url,
            ReceiptHandle=self._receipt,
            VisibilityTimeout=0,
        )

    def _retry(self, reason: str) -> None:
        extra = {ATTEMPTS_ATTRIBUTE: _number(self.attempts + 1), LAST_FAILURE_ATTRIBUTE: _text(reason)}
        self._call(
            "retry",
            self._client.send_message,
            QueueUrl=self._route.url,
            MessageBody=self._body_text,
            MessageAttributes=self._attributes_with(extra),
        )
        self._ack()

    def _reject(self, reason: str) -> None:
        extra = {
            ATTEMPTS_ATTRIBUTE: _number(self.attempts),
            REASON_ATTRIBUTE: _text(reason),
            REJECTED_QUEUE_ATTRIBUTE: _text(self.queue),
            REJECTED_AT_ATTRIBUTE: _text(utc_now_text()),
        }
        try:
            url = self._transport.dead_letter_url(self._route, self.queue)
        except (ClientError, BotoCoreError) as error:
            raise QueueError(f"cannot find or create {dead_letter_queue(self.queue)}: {error}") from error
        self._call(
            "reject",
            self._client.send_message,
            QueueUrl=url,
            MessageBody=self._body_text,
            MessageAttributes=self._attributes_with(extra),
        )
        self._ack()

    def _abandon(self) -> None:
        try:
            self._requeue()
        except QueueError as error:
            log.info("%s; it reappears when its visibility timeout ends", error)

    def _call(self, operation: str, method: Any, **arguments: Any) -> None:
        try:
            method(**arguments)
        except ClientError as error:
            if _error_code(error) in ("ReceiptHandleIsInvalid", "InvalidParameterValue", *_MISSING_QUEUE):
                raise DeliveryLost(f"could not {operation} a message from {self.queue}: {error}") from error
            raise QueueError(f"could not {operation} a message from {self.queue}: {error}") from error
        except BotoCoreError as error:
            raise QueueError(f"could not {operation} a message from {self.queue}: {error}") from error

    def _attributes_with(self, extra: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        kept = {name: _resend(value) for name, value in self._attributes.items() if name not in extra}
        room = MAX_MESSAGE_ATTRIBUTES - len(extra)
        if len(kept) > room:
            dropped = sorted(kept)[room:]
            log.warning(
                "dropping message attributes %s of a message from %s: SQS allows %d",
                dropped,
                self.queue,
                MAX_MESSAGE_ATTRIBUTES,
            )
            kept = {name: kept[name] for name in sorted(kept)[:room]}
        return {**kept, **extra}


def _resend(value: dict[str, Any]) -> dict[str, Any]:
    """A received attribute in the shape ``SendMessage`` takes."""
    out = {"DataType": value["DataType"]}
    if "BinaryValue" in value:
        out["BinaryValue"] = value["BinaryValue"]
    else:
        out["StringValue"] = value.get("StringValue", "")
    return out


def _text(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


def _number(value: int) -> dict[str, str]:
    return {"DataType": "Number", "StringValue": str(value)}


def _as_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))
