"""Secrets in, secrets out: experiments run with recognisable secret values, then every sink is searched.

Two kinds of secret, two rules:

* the runner's and Airflow's own (broker password, the runner's S3 and SQS keys, the AWS
  connection's keys in local mode, key folders and passphrase): in no sink at all, and invisible
  to the workload, which prints its environment and reads its parent's (the runner's);
* the experimenter's own (the request's credentials and ``config.env``): the workload's to use, so
  visible to it and in what it prints, and nowhere the runner or Airflow writes.

(a) is ``studio-runner serve`` as deploy/ runs it, fed by the real studioml client with encryption;
(b) is StudioExperimentOperator in local mode with a sealed request, through ``airflow dags test``.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from devtools.services import TEAM_S3_KEYS, Endpoints
from tests.broker import queue_depth, unique_queue
from tests.polling import wait_for
from tests.provider.task_context import runtime_context
from tests.runner.results import scrape_documents, tar_members
from tests.security.keys import (
    RunnerKey,
    message_keys_connection,
    new_signer,
    openssh_private,
    pem_body_lines,
    write_signers,
)
from tests.security.runners import (
    create_broker_user,
    delete_broker_user,
    drop_capabilities,
    peek,
    runner_environment,
    start_serve,
)
from tests.security.scan import PROBE, leaks, probe_report, without_probe_lines, without_workload_lines

RUNNER_ONLY_NAMES = (
    "AMQP_URL",
    "AMQP_MGT_URL",
    "AMQP_PASSWORD",
    "SQS_CERTS",
    "SQS_ENDPOINT",
    "ENCRYPT_DIR",
    "REQUEST_SIGNATURES_DIR",
    "QUEUE_MATCH",
    "RESULT_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def scrape_sinks(s3_client, bucket: str, key: str) -> tuple[str, str]:
    """Every scrape document of ``key`` (``metadata/``, checkpoints and final): whole, and without the
    console lines the workload printed."""
    documents = scrape_documents(s3_client, bucket, key)
    assert documents, f"no scrape document for {key}"
    return json.dumps(documents), json.dumps([without_workload_lines(d) for d in documents])


def assert_runner_hidden(report, forbidden: dict[str, str]) -> None:
    """The workload saw none of the runner's settings, and could not read the runner's environment."""
    assert not set(RUNNER_ONLY_NAMES) & set(report.env), sorted(report.env)
    assert not leaks({"the workload's environment": json.dumps(report.env)}, forbidden)
    if report.parent_environ is not None:
        exposed = leaks({"the runner's /proc/<pid>/environ": "\0".join(report.parent_environ)}, forbidden)
        raise AssertionError(f"the workload read its runner's environment: {exposed}")
    assert report.parent_denied["errno"] == errno.EACCES, report.parent_denied
    assert any(part.endswith("studio-runner") for part in report.parent_cmdline), report.parent_cmdline
    assert not leaks({"the runner's command line": " ".join(report.parent_cmdline)}, forbidden)


# --- (a) a queue runner fed by the studioml client ----------------------------------------------------


def test_a_queue_runner_keeps_its_secrets_from_sinks_and_workloads(
    studio_client, runner_cache: Path, services: Endpoints, s3_client, tmp_path: Path
) -> None:
    token = uuid.uuid4().hex[:10]
    team_b_key, team_b_secret = TEAM_S3_KEYS["team-b"]
    runner_secrets = {
        "AMQP password": f"amqp-password-{token}",
        "runner S3 key id": f"AKIARUNNERS3{token.upper()}",
        "runner S3 secret": f"runner-s3-secret-{token}",
        "SQS key id": f"AKIARUNNERSQS{token.upper()}",
        "SQS secret": f"runner-sqs-secret-{token}",
        "key passphrase": f"runner-passphrase-{token}",
    }
    key_folder = f"runner-keys-{token}"
    """Named in the runner's own log, as it should be; but the workload must not learn where it is."""
    request_secrets = {
        "request S3 key id": team_b_key,
        "request S3 secret": team_b_secret,
        "config.env token": f"wandb-token-{token}",
    }
    runner_key = RunnerKey.generate(runner_secrets["key passphrase"])
    signer = new_signer()
    runner_secrets |= {
        f"runner private key line {i}": line for i, line in enumerate(pem_body_lines(runner_key.private_pem))
    }

    # the runner's files: decryption key, trusted signers, an SQS credential set
    folder = tmp_path / key_folder
    encrypt_dir = runner_key.write_encrypt_dir(folder / "message")
    signers_dir = write_signers(folder / "signers", {"rmq_scan_": signer})
    sqs_set = folder / "sqs" / "default"
    sqs_set.mkdir(parents=True)
    (sqs_set / "credentials").write_text(
        f"[default]\naws_access_key_id = {runner_secrets['SQS key id']}\n"
        f"aws_secret_access_key = {runner_secrets['SQS secret']}\n"
    )
    (sqs_set / "config").write_text(f"[default]\nregion = {services.region}\n")

    # the experimenter's client: team B's bucket and keys, encryption on, a token of theirs in config.env
    bucket = f"team-b-{token}"
    s3_client.create_bucket(Bucket=bucket)
    (tmp_path / "client-keys").mkdir()
    (tmp_path / "client-keys" / "runner.pub").write_bytes(runner_key.public_pem)
    (tmp_path / "client-keys" / "signer").write_bytes(openssh_private(signer))
    config = yaml.safe_load(studio_client.config.read_text())
    store = {**config["storage"], "bucket": bucket}
    store["credentials"] = {"aws": {"access_key": team_b_key, "secret_access_key": team_b_secret}}
    config.update(
        storage=store,
        database={**config["database"], **store},
        public_key_path=str(tmp_path / "client-keys" / "runner.pub"),
        signing_key_path=str(tmp_path / "client-keys" / "signer"),
    )
    config["env"].update(
        AWS_ACCESS_KEY_ID=team_b_key,
        AWS_SECRET_ACCESS_KEY=team_b_secret,
        WANDB_API_KEY=request_secrets["config.env token"],
    )
    studio_client.config.write_text(yaml.safe_dump(config))

    queue = unique_queue("rmq_scan")
    key = f"scan_{queue}"
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "probe.py").write_text(PROBE)
    studio_client.run(workspace, queue, "probe.py", key=key)

    # anyone who may read the queue sees the envelope only
    (queued,) = peek(services, queue)
    assert json.loads(queued)["message"]["payload"]

    user = f"scan_{token}"
    amqp_url, management_url = create_broker_user(
        services, user, runner_secrets["AMQP password"], configure=".*", write=".*", read=".*"
    )
    try:
        result_file = tmp_path / "result.json"
        runner = start_serve(
            tmp_path / "runner.log",
            runner_environment(
                AMQP_URL=amqp_url,
                AMQP_MGT_URL=management_url,
                QUEUE_MATCH=f"^{queue}$",
                SQS_CERTS=str(folder / "sqs"),
                SQS_ENDPOINT=services.sqs_endpoint,
                ENCRYPT_DIR=str(encrypt_dir),
                REQUEST_SIGNATURES_DIR=str(signers_dir),
                AWS_ACCESS_KEY_ID=runner_secrets["runner S3 key id"],
                AWS_SECRET_ACCESS_KEY=runner_secrets["runner S3 secret"],
                AWS_DEFAULT_REGION=services.region,
                WORKING_DIR=str(tmp_path / "work"),
                CACHE_DIR=str(runner_cache),
                PROM_ADDRESS="off",
                LIMIT_TASKS="1",
                RESULT_FILE=str(result_file),
            ),
        )
        runner.process.wait(timeout=300)
    finally:
        delete_broker_user(services, user)
    log = runner.log.read_text(errors="replace")
    assert runner.process.returncode == 0, log[-4000:]
    result = json.loads(result_file.read_text())
    assert [e["status"] for e in result["experiments"]] == ["succeeded"], result
    wait_for(lambda: queue_depth(services.amqp_management_url, queue) == 0, 30, "the ack")

    output = tar_members(s3_client, bucket, f"experiments/{key}/output.tar")["./output"].decode()
    scrape_whole, scrape_runner_part = scrape_sinks(s3_client, bucket, key)
    report = probe_report(output)

    # the workload: the request's values, none of the runner's
    assert report.env["AWS_SECRET_ACCESS_KEY"] == team_b_secret
    assert report.env["WANDB_API_KEY"] == request_secrets["config.env token"]
    assert_runner_hidden(report, {**runner_secrets, "key folder": key_folder})
    assert "serve" in report.parent_cmdline

    runner_sinks = {
        "runner log": log,
        "runner result file": result_file.read_text(),
        "queued message": queued.decode(),
        "scrape documents (runner part)": scrape_runner_part,
    }
    assert not leaks(
        {**runner_sinks, "output artifact": output, "scrape documents": scrape_whole}, runner_secrets
    )
    assert not leaks(
        {"output artifact": output, "scrape documents": scrape_whole}, {"key folder": key_folder}
    )
    assert not leaks(runner_sinks, request_secrets)
    assert leaks({"output artifact": output}, request_secrets)  # printed by the workload, its own


# --- (b) StudioExperimentOperator, local mode, sealed request, through `airflow dags test` -------------

AWS_CONN = "studio_scan_s3"
KEYS_CONN = "studio_scan_keys"
TOKEN_CONN = "studio_scan_wandb"

DAG_FILE = """\
import pendulum
from airflow.sdk import DAG
from airflow_provider_studio.operators.experiment import StudioExperimentOperator

with DAG({dag_id!r}, schedule=None, start_date=pendulum.datetime(2026, 1, 1)) as dag:
    StudioExperimentOperator(
        task_id="probe",
        script="probe.py",
        workspace={workspace!r},
        results_bucket={bucket!r},
        aws_conn_id={aws_conn!r},
        message_keys_conn_id={keys_conn!r},
        experiment_key={key!r},
        pythonenv=[],
        env={{"WANDB_API_KEY": "{{{{ conn.{token_conn}.password }}}}", "EXPERIMENT_NOTE": "plain"}},
    )
"""


def query(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as connection:
        return connection.execute(sql, params).fetchall()


def dry_run_pod(dag_file: Path, monkeypatch: pytest.MonkeyPatch, connections: dict[str, str]) -> str:
    """The pod the same task would start in kubernetes mode, serialised."""
    for name, value in connections.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location(f"scan_dag_{uuid.uuid4().hex[:6]}", dag_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    op = module.dag.task_dict["probe"]
    op.execution_mode = "kubernetes"
    context = runtime_context(op)
    op.render_template_fields(context)
    op.prepare_request(context)
    return json.dumps(ApiClient().sanitize_for_serialization(op.build_pod_request_obj(context, dry_run=True)))


def test_a_local_sealed_experiment_keeps_secrets_out_of_airflow_and_the_workload(
    airflow_db: Path, services: Endpoints, s3_client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = uuid.uuid4().hex[:10]
    team_a_key, team_a_secret = TEAM_S3_KEYS["team-a"]
    runner_key = RunnerKey.generate(f"operator-passphrase-{token}")
    signer = new_signer()
    runner_secrets = {
        "AWS connection key id": team_a_key,
        "AWS connection secret": team_a_secret,
        "key passphrase": runner_key.passphrase.decode(),
        **{
            f"runner private key line {i}": line
            for i, line in enumerate(pem_body_lines(runner_key.private_pem))
        },
        **{f"signing key line {i}": line for i, line in enumerate(pem_body_lines(openssh_private(signer)))},
    }
    request_secrets = {"config.env token": f"wandb-token-{token}"}

    bucket = f"team-a-{token}"
    s3_client.create_bucket(Bucket=bucket)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "probe.py").write_text(PROBE)
    dag_id, key = f"studio_scan_{token}", f"scan-{token}"
    dags = tmp_path / "dags"
    dags.mkdir()
    dag_file = dags / "scan.py"
    dag_file.write_text(
        DAG_FILE.format(
            dag_id=dag_id,
            workspace=str(workspace),
            bucket=bucket,
            aws_conn=AWS_CONN,
            keys_conn=KEYS_CONN,
            key=key,
            token_conn=TOKEN_CONN,
        )
    )
    connections = {
        f"AIRFLOW_CONN_{AWS_CONN.upper()}": json.dumps(
            {
                "conn_type": "aws",
                "login": team_a_key,
                "password": team_a_secret,
                "extra": {"endpoint_url": services.s3_endpoint, "region_name": services.region},
            }
        ),
        f"AIRFLOW_CONN_{KEYS_CONN.upper()}": message_keys_connection(runner_key, signer),
        f"AIRFLOW_CONN_{TOKEN_CONN.upper()}": json.dumps(
            {"conn_type": "generic", "password": request_secrets["config.env token"]}
        ),
    }
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        **connections,
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__STUDIO__EXECUTION_MODE": "local",
    }
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", dag_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=drop_capabilities,
    )
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-6000:]

    db = airflow_db / "airflow.db"
    ((_run_id, state),) = query(db, "SELECT run_id, state FROM dag_run WHERE dag_id = ?", dag_id)
    assert state == "success", console[-6000:]
    xcoms = query(db, "SELECT key, value FROM xcom WHERE dag_id = ?", dag_id)
    summary = json.loads(dict(xcoms)["return_value"])
    assert summary["status"] == "succeeded" and summary["key"] == key
    (rendered,) = [
        row[0]
        for row in query(
            db, "SELECT rendered_fields FROM rendered_task_instance_fields WHERE dag_id = ?", dag_id
        )
    ]
    assert json.loads(rendered)["studio_request"]["experiment"]["key"] == key
    # `dags test` runs the task in-process and logs to its console, which is therefore the task log;
    # task log files, where a deployment's supervisor writes them, are scanned too when there are any
    task_logs = "\n".join(
        path.read_text(errors="replace")
        for path in (airflow_db / "logs").rglob("*")
        if path.is_file() and dag_id in str(path)
    )

    output = tar_members(s3_client, bucket, f"experiments/{key}/output.tar")["./output"].decode()
    scrape_whole, scrape_runner_part = scrape_sinks(s3_client, bucket, key)
    report = probe_report(output)
    assert report.env["WANDB_API_KEY"] == request_secrets["config.env token"]
    assert report.env["EXPERIMENT_NOTE"] == "plain"
    assert "AWS_ACCESS_KEY_ID" not in report.env and "AWS_SECRET_ACCESS_KEY" not in report.env
    assert_runner_hidden(report, runner_secrets)
    assert "run" in report.parent_cmdline
    assert not any("studio-message-keys" in part for part in report.parent_cmdline)

    pod = dry_run_pod(dag_file, monkeypatch, connections)
    airflow_sinks = {
        "task log (airflow dags test output)": console,
        "task log files": task_logs,
        "XCom": json.dumps(xcoms),
        "rendered template fields": rendered,
        "pod spec (dry run)": pod,
        "scrape documents (runner part)": scrape_runner_part,
    }
    assert not leaks(
        {**airflow_sinks, "output artifact": output, "scrape documents": scrape_whole}, runner_secrets
    )
    # the task log relays the workload's console, and with it what the workload chose to print
    airflow_sinks["task log (airflow dags test output)"] = without_probe_lines(console)
    airflow_sinks["task log files"] = without_probe_lines(task_logs)
    assert not leaks(airflow_sinks, request_secrets)
    assert leaks({"output artifact": output}, request_secrets)  # printed by the workload, its own
