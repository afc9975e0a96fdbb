"""Response-queue reports (spec §2.8): the proto3 JSON upstream consumers parse, the buffer, a real run.

The oracle for the wire format is protobuf itself: ``reports.proto`` is rebuilt here as a
descriptor and every report must parse with ``json_format.Parse`` (what upstream's
``response_catcher`` does) and print back identically with ``MessageToDict``, which writes
the canonical proto3 JSON mapping Go's ``protojson`` also writes.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
from pathlib import Path
from typing import Any

import nacl.secret
import pika
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.protobuf import (
    any_pb2,
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    timestamp_pb2,
    wrappers_pb2,
)
from studio_runner import reports
from studio_runner.envelope import RunnerKeyring
from studio_runner.reports import (
    NO_REPORTS,
    QueueReporter,
    ResponseQueues,
    encode,
    log_entry,
    progress,
    progress_error,
    report,
    timestamp,
)

from tests.broker import EXCHANGE, drain, unique_queue
from tests.polling import wait_for
from tests.runner.results import final_document

PACKAGE = "dev.studio_go_runner.reports"


# --- reports.proto as a descriptor, the oracle ------------------------------------------------------
def _report_class() -> type:
    field = descriptor_pb2.FieldDescriptorProto
    pool = descriptor_pool.DescriptorPool()
    for well_known in (timestamp_pb2, wrappers_pb2, any_pb2):
        pool.AddSerializedFile(well_known.DESCRIPTOR.serialized_pb)
    proto = descriptor_pb2.FileDescriptorProto(
        name="reports.proto",
        package=PACKAGE,
        syntax="proto3",
        dependency=[
            "google/protobuf/timestamp.proto",
            "google/protobuf/wrappers.proto",
            "google/protobuf/any.proto",
        ],
    )
    for name, values in (("LogSeverity", reports.LOG_SEVERITY), ("TaskState", reports.TASK_STATE)):
        enum = proto.enum_type.add(name=name)
        for value_name, number in values.items():
            enum.value.add(name=value_name, number=number)

    def add(message, name: str, number: int, kind: int, type_name: str = "", *, repeated=False, oneof=None):
        entry = message.field.add(
            name=name,
            number=number,
            type=kind,
            label=field.LABEL_REPEATED if repeated else field.LABEL_OPTIONAL,
        )
        if type_name:
            entry.type_name = type_name
        if oneof is not None:
            entry.oneof_index = oneof

    timestamp_type, string_value = ".google.protobuf.Timestamp", ".google.protobuf.StringValue"
    log = proto.message_type.add(name="LogEntry")
    add(log, "time", 1, field.TYPE_MESSAGE, timestamp_type)
    add(log, "severity", 2, field.TYPE_ENUM, f".{PACKAGE}.LogSeverity")
    add(log, "message", 3, field.TYPE_MESSAGE, string_value)
    entry = log.nested_type.add(name="FieldsEntry")
    entry.options.map_entry = True
    add(entry, "key", 1, field.TYPE_STRING)
    add(entry, "value", 2, field.TYPE_STRING)
    add(log, "fields", 4, field.TYPE_MESSAGE, f".{PACKAGE}.LogEntry.FieldsEntry", repeated=True)

    prog = proto.message_type.add(name="Progress")
    add(prog, "time", 1, field.TYPE_MESSAGE, timestamp_type)
    add(prog, "json", 2, field.TYPE_MESSAGE, string_value)
    add(prog, "state", 3, field.TYPE_ENUM, f".{PACKAGE}.TaskState")
    error = prog.nested_type.add(name="Error")
    add(error, "msg", 20, field.TYPE_MESSAGE, string_value)
    add(error, "code", 21, field.TYPE_INT32)
    add(prog, "error", 4, field.TYPE_MESSAGE, f".{PACKAGE}.Progress.Error")

    top = proto.message_type.add(name="Report")
    add(top, "time", 1, field.TYPE_MESSAGE, timestamp_type)
    add(top, "experiment_id", 2, field.TYPE_MESSAGE, string_value)
    add(top, "unique_id", 3, field.TYPE_MESSAGE, string_value)
    add(top, "executor_id", 4, field.TYPE_MESSAGE, string_value)
    top.oneof_decl.add(name="payload")
    add(top, "proto_any", 10, field.TYPE_MESSAGE, ".google.protobuf.Any", oneof=0)
    add(top, "text", 11, field.TYPE_MESSAGE, string_value, oneof=0)
    add(top, "logging", 12, field.TYPE_MESSAGE, f".{PACKAGE}.LogEntry", oneof=0)
    add(top, "progress", 13, field.TYPE_MESSAGE, f".{PACKAGE}.Progress", oneof=0)
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Report"))


Report = _report_class()


def canonical(document: dict[str, Any]) -> dict[str, Any]:
    """Parse as ``response_catcher`` does (unknown names are errors), print back as proto3 JSON."""
    message = json_format.Parse(encode(document), Report())
    return json_format.MessageToDict(message)


# --- the wire format ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "1970-01-01T00:00:00Z"),
        (1_632_823_200_000_000_000, "2021-09-28T10:00:00Z"),
        (1_632_823_200_120_000_000, "2021-09-28T10:00:00.120Z"),
        (1_632_823_200_123_456_000, "2021-09-28T10:00:00.123456Z"),
        (1_632_823_200_123_456_789, "2021-09-28T10:00:00.123456789Z"),
        (1_632_823_200_000_000_001, "2021-09-28T10:00:00.000000001Z"),
    ],
)
def test_timestamps_are_rfc3339_with_0_3_6_or_9_digits(ns, text):
    assert timestamp(ns) == text
    parsed = timestamp_pb2.Timestamp()
    parsed.FromJsonString(text)
    assert parsed.ToNanoseconds() == ns and parsed.ToJsonString() == text


def test_reports_are_canonical_proto3_json():
    now = timestamp(1_632_823_200_123_000_000)
    documents = [
        report(
            log_entry("scanning queue", "Debug", {"queue_name": "rmq_q"}, now=now),
            executor_id="pod-1",
            now=now,
        ),
        report(
            progress("Started", now=now),
            experiment_id="k",
            unique_id="pod-1-1Ab",
            executor_id="pod-1",
            now=now,
        ),
        report(log_entry("start", now=now), experiment_id="k", unique_id="u", executor_id="pod-1", now=now),
        report(
            log_entry("stop", fields={"success": "False", "error": "boom"}, now=now),
            experiment_id="k",
            now=now,
        ),
        report(progress("Success", error={}, now=now), experiment_id="k", now=now),
        report(progress("Failed", error=progress_error("exit 3", 3), now=now), experiment_id="k", now=now),
        report(log_entry("quiet", "Default", now=now), now=now),
        report(progress("Prestart", json_text='{"a": 1}', now=now), now=now),
        report({"text": "plain ünïcode ✓"}, now=now),
    ]
    for document in documents:
        assert canonical(document) == document


def test_field_names_and_enum_values_as_upstream_wrote_them():
    document = report(
        progress("Success", error={}), experiment_id="exp", unique_id="host-1", executor_id="host"
    )
    assert list(document) == ["time", "experimentId", "uniqueId", "executorId", "progress"]
    assert document["progress"]["state"] == "Success" and document["progress"]["error"] == {}
    started = report(progress("Started"))["progress"]
    assert set(started) == {"time", "state"}  # no error on Started, as upstream sent it
    entry = log_entry("line")["logging"]
    assert entry["severity"] == "Info" and "fields" not in entry  # empty maps are left out
    assert log_entry("x", "Default")["logging"].keys() == {"time", "message"}  # zero enums are left out
    assert progress("Prestart")["progress"].keys() == {"time"}
    assert progress_error("", 0) == {} and progress_error("m", 2**40) == {"msg": "m", "code": 2**31 - 1}
    message = json_format.Parse(encode(document), Report())
    assert message.progress.state == 21 and message.experiment_id.value == "exp"
    assert json_format.Parse(encode(report(log_entry("e", "Error"))), Report()).logging.severity == 500


# --- the reporter ----------------------------------------------------------------------------------
class FakeSender:
    """Collects bodies; ``gate`` holds every send until set, ``fail`` raises on the first sends."""

    def __init__(self, gate: threading.Event | None = None, fail: int = 0) -> None:
        self.bodies: list[bytes] = []
        self.gate = gate
        self.fail = fail
        self.entered = threading.Event()
        self.closed = False
        self.thread: int | None = None

    def send(self, body: bytes) -> None:
        self.thread = threading.get_ident()
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise ConnectionError("broker gone")
        self.bodies.append(body)

    def idle(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def unseal(body: bytes) -> dict[str, Any]:
    return json.loads(base64.b64decode(body))


def reporter_with(sender: FakeSender, **options: Any) -> QueueReporter:
    return QueueReporter(
        queue="rmq_q",
        experiment_id="exp",
        seal=lambda data: base64.b64encode(data).decode(),
        open_sender=lambda: sender,
        executor_id="pod-1",
        **options,
    )


def summary(document: dict[str, Any]) -> tuple:
    if "logging" in document:
        entry = document["logging"]
        return ("log", entry.get("severity", "Default"), entry["message"], entry.get("fields", {}))
    entry = document["progress"]
    return ("progress", entry.get("state", "Prestart"), entry.get("error"))


def test_the_upstream_sequence_of_reports():
    sender = FakeSender()
    reporter = reporter_with(sender)
    reporter.started("pod-1-1Ab")
    reporter.line("epoch 1")
    reporter.line("epoch 2")
    reporter.stopped(True)
    reporter.close()
    documents = [unseal(body) for body in sender.bodies]
    assert [summary(d) for d in documents] == [
        ("log", "Debug", "scanning queue", {"queue_name": "rmq_q"}),
        ("progress", "Started", None),
        ("log", "Info", "start", {}),
        ("log", "Info", "epoch 1", {}),
        ("log", "Info", "epoch 2", {}),
        ("log", "Info", "stop", {"success": "True"}),
        ("progress", "Success", {}),
    ]
    assert "experimentId" not in documents[0] and documents[0]["executorId"] == "pod-1"
    assert all(d["experimentId"] == "exp" and d["uniqueId"] == "pod-1-1Ab" for d in documents[1:])
    assert all(canonical(d) == d for d in documents)
    assert sender.closed and sender.thread != threading.get_ident()  # published from the reporter's thread


def test_a_failed_attempt_reports_stop_with_the_error_then_failed():
    sender = FakeSender()
    reporter = reporter_with(sender)
    reporter.started("u")
    reporter.stopped(False, "the workload exited with status 3", 3)
    reporter.close()
    tail = [summary(unseal(body)) for body in sender.bodies][-2:]
    assert tail == [
        ("log", "Info", "stop", {"error": "the workload exited with status 3", "success": "False"}),
        ("progress", "Failed", {"msg": "the workload exited with status 3", "code": 3}),
    ]


def test_a_full_buffer_drops_lines_but_keeps_the_lifecycle_reports():
    gate = threading.Event()
    sender = FakeSender(gate)
    reporter = reporter_with(sender, capacity=16)
    assert sender.entered.wait(10)  # the publisher is stuck sending "scanning queue"
    reporter.started("u")
    for number in range(100):
        reporter.line(f"line {number}")  # never blocks, however slow the broker
    reporter.stopped(True)
    assert reporter.dropped > 0
    gate.set()
    reporter.close()
    sent = [summary(unseal(body)) for body in sender.bodies]
    lines = [s[2] for s in sent if s[0] == "log" and s[2].startswith("line ")]
    assert lines == [f"line {n}" for n in range(len(lines))]  # the oldest kept, in order
    assert len(sent) + reporter.dropped == 1 + 2 + 100 + 2
    assert sent[-2:] == [("log", "Info", "stop", {"success": "True"}), ("progress", "Success", {})]


def test_a_broken_broker_never_fails_the_attempt(monkeypatch):
    monkeypatch.setattr(reports, "RECONNECT_SECONDS", 0.0)
    flaky = FakeSender(fail=2)
    reporter = reporter_with(flaky)
    reporter.started("u")
    reporter.stopped(True)
    reporter.close()
    assert reporter.dropped == 2
    assert [summary(unseal(b))[2] for b in flaky.bodies] == ["start", "stop", {}]

    def unreachable() -> FakeSender:
        raise ConnectionError("no broker")

    silent = QueueReporter(
        queue="rmq_q", experiment_id="exp", seal=lambda data: "x", open_sender=unreachable, executor_id="pod"
    )
    silent.started("u")
    silent.line("lost")
    silent.stopped(True)
    silent.close()
    assert silent.dropped == 6


def test_closing_an_unfinished_attempt_still_reports_its_end():
    sender = FakeSender()
    reporter = reporter_with(sender)
    reporter.started("u")
    reporter.close()
    assert summary(unseal(sender.bodies[-1]))[:2] == ("progress", "Failed")


def test_the_null_reporter_does_nothing():
    NO_REPORTS.started("u")
    NO_REPORTS.line("x")
    NO_REPORTS.stopped(False, "e", 1)
    NO_REPORTS.close()


# --- which attempts report, and with which key ------------------------------------------------------
@pytest.fixture(scope="module")
def response_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def team_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pkcs1_public(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)


def catch(body: bytes, key: rsa.RSAPrivateKey) -> dict[str, Any]:
    """Decrypt a report the way upstream's ``response_catcher`` does, independently of our code."""
    wrapped, boxed = body.decode("utf-8").split(",")
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    session = key.decrypt(base64.b64decode(wrapped), oaep)
    sealed = base64.b64decode(boxed)
    clear = nacl.secret.SecretBox(session).decrypt(sealed[24:], sealed[:24])
    return json_format.MessageToDict(json_format.Parse(clear, Report()))


def response_queues(
    tmp_path: Path, keys: dict[str, rsa.RSAPrivateKey], exists=lambda name: True, senders=None
):
    folder = tmp_path / "response-keys"
    folder.mkdir(exist_ok=True)
    for prefix, key in keys.items():
        (folder / prefix).write_bytes(pkcs1_public(key))
    message_keys = RunnerKeyring.from_options(response_signatures_dir=folder)
    assert message_keys is not None
    opened: list[str] = []

    def open_sender(name: str) -> FakeSender:
        opened.append(name)
        sender = FakeSender()
        if senders is not None:
            senders.append(sender)
        return sender

    return ResponseQueues(message_keys, exists=exists, open_sender=open_sender, executor_id="pod"), opened


def test_reports_are_sealed_for_the_longest_prefix_of_the_response_queue(tmp_path, response_key, team_key):
    senders: list[FakeSender] = []
    queues, opened = response_queues(tmp_path, {"rmq_": response_key, "rmq_team_": team_key}, senders=senders)
    reporter = queues.open("rmq_team_7", "exp")
    reporter.started("u")
    reporter.stopped(True)
    reporter.close()
    assert opened == ["rmq_team_7_response"]
    documents = [catch(body, team_key) for body in senders[0].bodies]
    assert [summary(d)[2] for d in documents] == ["scanning queue", None, "start", "stop", {}]


def test_no_reports_without_the_response_queue_or_a_key(tmp_path, response_key):
    queues, opened = response_queues(tmp_path, {"rmq_team_": response_key}, exists=lambda name: False)
    assert queues.open("rmq_team_7", "exp") is NO_REPORTS

    def management_down(name: str) -> bool:
        raise OSError("connection refused")

    queues, opened = response_queues(tmp_path, {"rmq_team_": response_key}, exists=management_down)
    assert queues.open("rmq_team_7", "exp") is NO_REPORTS
    queues, opened = response_queues(tmp_path, {"rmq_team_": response_key})
    assert queues.open("rmq_other", "exp") is NO_REPORTS
    assert opened == []


# --- one real experiment, read by a consumer standing in for response_catcher ------------------------
WORKLOAD = """\
import sys
for epoch in range(3):
    print(f"epoch {epoch}")
print("to stderr", file=sys.stderr)
"""


def declare_response_queue(amqp_url: str, queue: str) -> str:
    """What the experimenter does to ask for reports: create ``<queue>_response`` bound to the exchange."""
    response_queue = f"{queue}_response"
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True, auto_delete=True)
        channel.queue_declare(response_queue)
        channel.queue_bind(response_queue, EXCHANGE, routing_key=f"StudioML.{response_queue}")
    finally:
        connection.close()
    return response_queue


def test_a_real_run_reports_its_progress(
    studio_client, serve_runner, s3_client, services, tmp_path, response_key
):
    queue = unique_queue("rmq_reports")
    key = f"reported_{queue}"
    folder = tmp_path / "response-keys"
    folder.mkdir()
    (folder / "rmq_reports_").write_bytes(pkcs1_public(response_key))
    response_queue = declare_response_queue(services.amqp_url, queue)
    serve_runner("--response-signatures-dir", str(folder))
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "train.py").write_text(WORKLOAD)
    studio_client.run(workspace, queue, "train.py", key=key)

    assert wait_for(lambda: final_document(s3_client, studio_client.bucket, key), 300, "the scrape document")
    received: list[bytes] = []

    def finished() -> bool:
        received.extend(body for body, _headers in drain(services.amqp_url, response_queue))
        return bool(received) and "progress" in catch(received[-1], response_key)

    wait_for(finished, 60, "the final report")
    documents = [catch(body, response_key) for body in received]
    kinds = [summary(d) for d in documents]
    assert kinds[0] == ("log", "Debug", "scanning queue", {"queue_name": queue})
    assert kinds[1:3] == [("progress", "Started", None), ("log", "Info", "start", {})]
    assert kinds[-2:] == [("log", "Info", "stop", {"success": "True"}), ("progress", "Success", {})]
    lines = [k[2] for k in kinds[3:-2]]
    assert all(k[:2] == ("log", "Info") for k in kinds[3:-2])
    workload = [line for line in lines if line.startswith("epoch ") or line == "to stderr"]
    assert workload == ["epoch 0", "epoch 1", "epoch 2", "to stderr"]
    host = socket.gethostname()
    for document in documents:
        assert set(document) <= {"time", "experimentId", "uniqueId", "executorId", "logging", "progress"}
        assert document["executorId"] == host
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3}|\.\d{6}|\.\d{9})?Z", document["time"])
    for document in documents[1:]:
        assert document["experimentId"] == key
        # the attempt's accession: host, this process's attempt tag, then whole seconds (§5.1)
        assert re.fullmatch(re.escape(host) + r"_\d+(\.\d+)?-[0-9A-Za-z]+", document["uniqueId"])
    assert len({d["uniqueId"] for d in documents[1:]}) == 1
