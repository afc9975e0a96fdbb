"""``studio-runner serve`` started as deploy/ starts it: secrets only in its environment and in files,
and no Linux capabilities, so that what its workloads can read here is what they can read in a pod."""

from __future__ import annotations

import base64
import ctypes
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlsplit

from devtools.services import Endpoints
from tests.runner.processes import RunnerProcess

PR_CAPBSET_DROP = 24
_LIBC = ctypes.CDLL(None, use_errno=True)
_LAST_CAP = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
_RUNNER_SETTINGS = ("AIRFLOW", "_AIRFLOW", "AWS_", "AMQP_", "QUEUE_", "SQS_", "ENCRYPT_DIR", "REQUEST_")


def drop_capabilities() -> None:
    """``preexec_fn``: empty the capability bounding set, as ``capabilities: drop: [ALL]`` does in a pod.

    These tests may run as root, and root's CAP_SYS_PTRACE reads any process's ``/proc/<pid>/environ``
    whatever the process does; runner pods have no capabilities, so the processes started here have
    none either. (Only ``prctl`` calls here: this runs between fork and exec.)
    """
    for capability in range(_LAST_CAP + 1):
        _LIBC.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)


def runner_environment(**settings: str) -> dict[str, str]:
    """This process's environment less any runner setting or credential, plus ``settings``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith(_RUNNER_SETTINGS)}
    env.update(settings)
    return env


def start_serve(log: Path, env: dict[str, str]) -> RunnerProcess:
    """``studio-runner serve`` with every option from ``env`` (nothing secret on its command line)."""
    command = [str(Path(sys.executable).parent / "studio-runner"), "serve"]
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, preexec_fn=drop_capabilities
        )
    return RunnerProcess(process, log)


# --- broker users ---------------------------------------------------------------------------------
def _management(services: Endpoints, path: str, method: str, body: dict | None = None) -> bytes:
    parts = urlsplit(services.amqp_management_url)
    request = urllib.request.Request(
        f"http://{parts.hostname}:{parts.port}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"content-type": "application/json"},
    )
    token = base64.b64encode(f"{parts.username}:{parts.password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return answer.read()


def create_broker_user(
    services: Endpoints, user: str, password: str, *, configure: str, write: str, read: str
) -> tuple[str, str]:
    """A RabbitMQ user with the management tag (runners discover queues through the API) and these
    permissions on ``/``; returns its AMQP and management URLs, password included."""
    _management(services, f"/api/users/{quote(user)}", "PUT", {"password": password, "tags": "management"})
    _management(
        services,
        f"/api/permissions/%2F/{quote(user)}",
        "PUT",
        {"configure": configure, "write": write, "read": read},
    )
    amqp, mgt = urlsplit(services.amqp_url), urlsplit(services.amqp_management_url)
    return (
        f"amqp://{user}:{password}@{amqp.hostname}:{amqp.port}/%2f",
        f"http://{user}:{password}@{mgt.hostname}:{mgt.port}",
    )


def delete_broker_user(services: Endpoints, user: str) -> None:
    _management(services, f"/api/users/{quote(user)}", "DELETE")


def peek(services: Endpoints, queue: str) -> list[bytes]:
    """The bodies waiting in ``queue``, left in place: what anyone allowed to read it would see."""
    answer = _management(
        services,
        f"/api/queues/%2F/{quote(queue, safe='')}/get",
        "POST",
        {"count": 10, "ackmode": "ack_requeue_true", "encoding": "auto"},
    )
    return [message["payload"].encode() for message in json.loads(answer)]


def set_topic_permissions(services: Endpoints, user: str, exchange: str, *, write: str, read: str) -> None:
    """Routing keys ``user`` may publish (``write``) and bind (``read``) on a topic exchange."""
    _management(
        services,
        f"/api/topic-permissions/%2F/{quote(user)}",
        "PUT",
        {"exchange": exchange, "write": write, "read": read},
    )
