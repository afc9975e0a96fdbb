"""Two teams on one broker and one object store, separated as deploy/ ships it (docs/security.md).

Each team has its own runner (deploy/studio-team-b/, and a team A made from it), taking only its
queues (``QUEUE_MATCH``), trusting only its own signer (a file named with its queue prefix in its
own request-signers Secret), reaching the broker as its own user (the permissions in
deploy/README.md) and the object store as its own identity (a bucket-prefix policy, here the
SeaweedFS identities ``team-a``/``team-b`` of devtools/services.py).

What that must give: team A cannot read team B's queue; a request team A signs and slips into team
B's queue is dead-lettered with the reason; team B's experiments, with team B's keys or with its
runner's own identity, cannot read team A's workspace, and the runner says so.
"""

from __future__ import annotations

import json
import re
import shlex
import uuid
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
import yaml
from studio_runner.envelope import seal

from devtools.services import TEAM_S3_KEYS, Endpoints
from tests.broker import dead_letters, declare_like_client, publish_like_client
from tests.polling import wait_for
from tests.runner.client_requests import client_request, upload_blob, workspace_tar
from tests.runner.processes import RunnerProcess
from tests.runner.results import final_document, tar_members
from tests.security.keys import RunnerKey, new_signer, write_signers
from tests.security.runners import (
    create_broker_user,
    delete_broker_user,
    runner_environment,
    set_topic_permissions,
    start_serve,
)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SHIPPED_TEAM = "team_b"
TRAIN = b"print('ran as', __import__('os').environ.get('TEAM'))\n"


def shipped_team_settings(team: str) -> dict[str, Any]:
    """deploy/'s settings for ``team`` (``team_a`` or ``team_b``): the team-b namespace as shipped,
    renamed for another team the way deploy/README.md says each team gets one."""
    options = yaml.safe_load((DEPLOY / "studio-team-b" / "20-configmap-options.yaml").read_text())["data"]
    secrets = list(yaml.safe_load_all((DEPLOY / "secrets" / "studio-team-b.example.yaml").read_text()))
    (signers,) = [s for s in secrets if s["metadata"]["name"] == "studio-runner-request-signers"]
    readme = (DEPLOY / "README.md").read_text().splitlines()
    (line,) = [line for line in readme if line.startswith("rabbitmqctl set_permissions")]
    *_, user, configure, write, read = shlex.split(line)
    (line,) = [line for line in readme if line.startswith("rabbitmqctl set_topic_permissions")]
    *_, topic_user, exchange, topic_write, topic_read = shlex.split(line)
    assert user == topic_user == SHIPPED_TEAM and options["QUEUE_MATCH"] == "^rmq_team_b_.*$"
    assert (
        options["CLEAR_TEXT_MESSAGES"] == "false"
        and options["ENCRYPT_DIR"]
        and options["REQUEST_SIGNATURES_DIR"]
    )

    def rename(text: str) -> str:
        return text.replace(SHIPPED_TEAM, team)

    return {
        "QUEUE_MATCH": rename(options["QUEUE_MATCH"]),
        "CLEAR_TEXT_MESSAGES": options["CLEAR_TEXT_MESSAGES"],
        "MAX_ATTEMPTS": options["MAX_ATTEMPTS"],
        "signer_prefixes": [rename(prefix) for prefix in signers["stringData"]],
        "broker_permissions": {"configure": rename(configure), "write": rename(write), "read": rename(read)},
        "topic_permissions": {"exchange": exchange, "write": rename(topic_write), "read": rename(topic_read)},
    }


class Team:
    """One team: its runner's keys and settings, its signer, its bucket, its broker user."""

    def __init__(self, name: str, token: str, root: Path, services: Endpoints) -> None:
        self.name = name  # "team_a"
        self.settings = shipped_team_settings(name)
        self.prefix = f"rmq_{name}_"
        self.queue = f"{self.prefix}{token}"
        self.bucket = f"{name.replace('_', '-')}-{token}"
        self.s3_keys = TEAM_S3_KEYS[name.replace("_", "-")]
        self.runner_key = RunnerKey.generate(f"{name}-passphrase-{token}")
        self.signer = new_signer()
        self.root = root / name
        self.user = f"{name}_{token}"
        self.runner: RunnerProcess | None = None
        self.services = services

    def start_runner(self, cache: Path) -> RunnerProcess:
        """The team's `studio-runner serve`, configured as deploy/ configures it."""
        encrypt_dir = self.runner_key.write_encrypt_dir(self.root / "encryption")
        signers = write_signers(
            self.root / "request-signers",
            {prefix: self.signer for prefix in self.settings["signer_prefixes"]},
        )
        aws = self.root / "aws"
        aws.mkdir()
        (aws / "credentials").write_text(
            f"[default]\naws_access_key_id = {self.s3_keys[0]}\naws_secret_access_key = {self.s3_keys[1]}\n"
        )
        (aws / "config").write_text(f"[default]\nregion = {self.services.region}\n")
        amqp_url, management_url = create_broker_user(
            self.services, self.user, f"pw-{self.user}", **self.settings["broker_permissions"]
        )
        topic = self.settings["topic_permissions"]
        set_topic_permissions(
            self.services, self.user, topic["exchange"], write=topic["write"], read=topic["read"]
        )
        self.runner = start_serve(
            self.root / "runner.log",
            runner_environment(
                AMQP_URL=amqp_url,
                AMQP_MGT_URL=management_url,
                QUEUE_MATCH=self.settings["QUEUE_MATCH"],
                CLEAR_TEXT_MESSAGES=self.settings["CLEAR_TEXT_MESSAGES"],
                MAX_ATTEMPTS=self.settings["MAX_ATTEMPTS"],
                ENCRYPT_DIR=str(encrypt_dir),
                REQUEST_SIGNATURES_DIR=str(signers),
                AWS_SHARED_CREDENTIALS_FILE=str(aws / "credentials"),
                AWS_CONFIG_FILE=str(aws / "config"),
                AWS_DEFAULT_REGION=self.services.region,
                WORKING_DIR=str(self.root / "work"),
                CACHE_DIR=str(cache),
                PROM_ADDRESS="off",
            ),
        )
        return self.runner

    def request(
        self, key: str, workspace: tuple[str, str], *, keys: tuple[str, str] | None
    ) -> dict[str, Any]:
        """A request as the client builds it, results in this team's bucket, reading ``workspace``
        (bucket, object key) with ``keys`` in every artifact, or with none (the runner's own identity)."""
        bucket, object_key = workspace
        request = client_request(self.services, self.bucket, key, object_key)
        host = self.services.s3_endpoint.split("://", 1)[1]
        artifacts = request["experiment"]["artifacts"]
        artifacts["workspace"].update(qualified=f"s3://{host}/{bucket}/{object_key}", bucket=bucket)
        for artifact in artifacts.values():
            if keys is None:
                artifact.pop("credentials")
            else:
                artifact["credentials"] = {"aws": {"access_key": keys[0], "secret_access_key": keys[1]}}
        request["config"]["env"]["TEAM"] = self.name
        return request

    def sealed_for(self, request: dict[str, Any], signer) -> bytes:
        """``request`` encrypted for this team's runner, signed by ``signer``."""
        return json.dumps(seal(json.dumps(request), self.runner_key.public_pem, signer)).encode()

    def close(self) -> None:
        if self.runner is not None:
            self.runner.stop()
        delete_broker_user(self.services, self.user)


@pytest.fixture
def teams(services: Endpoints, s3_client, tmp_path: Path):
    token = uuid.uuid4().hex[:10]
    built = {name: Team(name, token, tmp_path, services) for name in ("team_a", "team_b")}
    for team in built.values():
        s3_client.create_bucket(Bucket=team.bucket)
    yield built
    for team in built.values():
        team.close()


def test_teams_cannot_read_each_others_queues_work_or_workspaces(
    teams: dict[str, Team], runner_cache: Path, services: Endpoints, s3_client
) -> None:
    a, b = teams["team_a"], teams["team_b"]
    for team in (a, b):
        declare_like_client(services.amqp_url, team.queue)  # as the teams' clients do
        team.start_runner(runner_cache)

    # team A's own experiment: its workspace and results are "team A's data"
    a_workspace = (a.bucket, upload_blob(s3_client, a.bucket, workspace_tar({"train.py": TRAIN})))
    a_key = f"own_{a.queue}"
    publish_like_client(
        services.amqp_url, a.queue, [a.sealed_for(a.request(a_key, a_workspace, keys=a.s3_keys), a.signer)]
    )
    document = wait_for(lambda: final_document(s3_client, a.bucket, a_key), 300, "team A's experiment")
    assert document["studioml"]["status"] == "succeeded"

    # team A's broker user can neither read team B's queue nor route into it through the shared exchange
    a_url = f"amqp://{a.user}:pw-{a.user}@{services.amqp_url.split('@', 1)[1]}"
    forged = b.sealed_for(b.request(f"forged_{b.queue}", a_workspace, keys=a.s3_keys), a.signer)
    connection = pika.BlockingConnection(pika.URLParameters(a_url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            connection.channel().basic_get(b.queue)
        assert refused.value.reply_code == 403
        channel = connection.channel()
        channel.confirm_delivery()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.basic_publish("StudioML.topic", f"StudioML.{b.queue}", forged, mandatory=True)
        assert refused.value.reply_code == 403  # the topic permissions
    finally:
        connection.close()
    # the second line: whoever can still put team A's signed work on team B's queue (a broker
    # administrator, leaked broker credentials, a permission set too wide) gets it dead-lettered
    publish_like_client(services.amqp_url, b.queue, [forged])

    # team B's experiments reaching for team A's workspace, with team B's keys and with its runner's own
    b_workspace = (b.bucket, upload_blob(s3_client, b.bucket, workspace_tar({"train.py": TRAIN})))
    with_keys, with_runner_identity, control = (f"{name}_{b.queue}" for name in ("keys", "runner", "own"))
    publish_like_client(
        services.amqp_url,
        b.queue,
        [
            b.sealed_for(b.request(with_keys, a_workspace, keys=b.s3_keys), b.signer),
            b.sealed_for(b.request(with_runner_identity, a_workspace, keys=None), b.signer),
            b.sealed_for(b.request(control, b_workspace, keys=b.s3_keys), b.signer),
        ],
    )

    dead: list[tuple[bytes, dict[str, Any]]] = []
    wait_for(lambda: dead.extend(dead_letters(services, b.queue)) or len(dead) >= 3, 300, "3 dead letters")
    reasons = {json_key(body, b): headers["x-studio-reject-reason"] for body, headers in dead}
    assert reasons["?"].startswith(
        "invalid: the signature does not verify with the signing key for prefix 'rmq_team_b_'"
    )
    denied = re.compile(
        r"^failed after 3 attempts: infrastructure_error: artifact 'workspace' \(s3://[^/]+/"
        + a.bucket
        + r"/blobstore/[^)]+\): .*(AccessDenied|403 \(Forbidden\)).*check the artifact's credentials"
    )
    for key in (with_keys, with_runner_identity):
        assert denied.search(reasons[key]), reasons[key]
        output = tar_members(s3_client, b.bucket, f"experiments/{key}/output.tar")["./output"].decode()
        assert "check the artifact's credentials" in output  # the experimenter reads why in its output
    assert final_document(s3_client, b.bucket, control)["studioml"]["status"] == "succeeded"
    assert (
        "ran as team_b"
        in tar_members(s3_client, b.bucket, f"experiments/{control}/output.tar")["./output"].decode()
    )

    # nothing of team B's landed in team A's bucket, and team A's runner never saw team B's work
    a_objects = [o["Key"] for o in s3_client.list_objects_v2(Bucket=a.bucket).get("Contents", [])]
    assert not [k for k in a_objects if b.queue in k], a_objects
    assert b.queue not in a.runner.log.read_text()


def json_key(body: bytes, team: Team) -> str:
    """The experiment key inside a dead letter this team's runner can open, or "?" if it cannot."""
    from studio_runner.envelope import RunnerKeyring, open_message
    from studio_runner.request import RequestError

    keys = RunnerKeyring(team.root / "encryption", team.root / "request-signers")
    try:
        return open_message(body, team.queue, keys, clear_text_allowed=False).key
    except RequestError:
        return "?"
