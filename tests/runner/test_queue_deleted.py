"""A deleted queue cancels the work running from it (RUNNER_PROTOCOL.md §2.7, issue 9 item 3).

The service's queue refresh sees the queue gone, confirms it with the transport, and withdraws
the running request: the job's process group is stopped, nothing is recorded as success, the
scrape document says ``cancelled`` and why, and the runner carries on with its other queues.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from studio_runner.outcome import Outcome, Status
from studio_runner.queues.localdir import LocalDirTransport, publish
from studio_runner.service import Message, QueueMatcher, Service

from devtools.services import Endpoints
from tests.broker import management, publish_like_client, unique_queue
from tests.polling import wait_for
from tests.runner.client_requests import client_request, upload_blob, workspace_tar

pytestmark = pytest.mark.timeout(300)

SCRAPE_PREFIX = "metadata/scrape-host-"

WORKLOAD = """\
import os, sys, time
key, pids, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
with open(os.path.join(pids, key), "w") as out:
    out.write(str(os.getpid()))
print(f"start {key}", flush=True)
time.sleep(seconds)
print(f"done {key}", flush=True)
"""


def test_a_deleted_local_queue_withdraws_its_running_request(tmp_path: Path) -> None:
    publish(tmp_path, "local_gone", b"request")
    publish(tmp_path, "local_stays", b"other")
    started, seen = threading.Event(), {}

    def handler(message: Message) -> Outcome:
        if message.queue == "local_stays":
            seen["other"] = message.body
            return Outcome(Status.SUCCEEDED)
        started.set()
        message.cancel.wait(30)
        seen["withdrawn"] = message.cancel.withdrawn
        return Outcome(Status.CANCELLED, reason=message.cancel.withdrawn or "")

    service = Service(
        [LocalDirTransport(tmp_path)],
        QueueMatcher(),
        handler,
        limit_tasks=2,
        poll_interval=0.05,
        max_poll_interval=0.2,
        refresh_interval=0.2,
    )
    runner = threading.Thread(target=lambda: seen.setdefault("summary", service.run()), daemon=True)
    runner.start()
    assert started.wait(10)
    shutil.rmtree(tmp_path / "local_gone")
    runner.join(30)
    assert seen["withdrawn"] == "queue local_gone was deleted"
    assert seen["other"] == b"other"
    assert seen["summary"].statuses == {"cancelled": 1, "succeeded": 1}


def scrape_documents(s3, bucket: str, key: str) -> list[dict[str, Any]]:
    documents = []
    for item in s3.list_objects_v2(Bucket=bucket, Prefix=SCRAPE_PREFIX).get("Contents", []):
        document = json.loads(s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read())
        if document.get("studioml", {}).get("experiment", {}).get("key") == key:
            documents.append(document["studioml"])
    return documents


def test_deleting_a_rabbitmq_queue_mid_run_cancels_its_work_and_the_runner_goes_on(
    services: Endpoints, s3_client, bucket: str, serve_runner: Callable[..., Any], tmp_path: Path
) -> None:
    doomed, other = unique_queue("rmq_deleted"), unique_queue("rmq_kept")
    pids = tmp_path / "pids"
    pids.mkdir()
    workspace_key = upload_blob(s3_client, bucket, workspace_tar({"train.py": WORKLOAD.encode()}))

    def body(key: str, seconds: int) -> bytes:
        args = (key, shlex.quote(str(pids)), str(seconds))
        return json.dumps(client_request(services, bucket, key, workspace_key, args=args)).encode()

    long_key, short_key = f"long_{doomed}", f"short_{other}"
    publish_like_client(services.amqp_url, doomed, [body(long_key, 600)], persistent=True)
    runner = serve_runner("--queue-match", f"^({doomed}|{other})$")
    pid_file = wait_for(lambda: (pids / long_key).exists() and pids / long_key, 120, "the workload to start")
    workload = int(pid_file.read_text())
    management(services.amqp_management_url, f"/api/queues/%2F/{doomed}", "DELETE")

    def ended() -> dict[str, Any] | None:
        return next(
            (d for d in scrape_documents(s3_client, bucket, long_key) if d["status"] != "running"), None
        )

    document = wait_for(ended, 90, "the cancelled attempt's scrape document", interval=1.0)
    assert document["status"] == "cancelled"
    assert document["reason"] == f"queue {doomed} was deleted"
    assert [d["status"] for d in scrape_documents(s3_client, bucket, long_key)] == ["cancelled"]
    assert not os.path.exists(f"/proc/{workload}") or _zombie(workload), "the workload still runs"
    events = runner.events()
    assert any(
        e.get("msg", "").startswith(f"request from {doomed} ended cancelled") and e["msg"].endswith("release")
        for e in events
    )
    assert not any("ended succeeded" in e.get("msg", "") and e.get("queue") == doomed for e in events)

    # the runner goes on with its other queues
    publish_like_client(services.amqp_url, other, [body(short_key, 0)], persistent=True)
    wait_for(
        lambda: any(d["status"] == "succeeded" for d in scrape_documents(s3_client, bucket, short_key)),
        120,
        "the other queue's request to succeed",
        interval=1.0,
    )
    assert runner.process.poll() is None


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"
