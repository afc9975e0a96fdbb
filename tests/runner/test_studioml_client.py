"""The real ``studioml`` client against a real ``studio-runner serve``, RabbitMQ and SeaweedFS.

Experimenters' existing scripts must work unchanged: ``studio run`` results land where the
client looks, ``CompletionService.getResults()`` returns, and bad work never blocks a queue.
"""

from __future__ import annotations

import json

import pytest

from tests.broker import dead_letters, publish_like_client, queue_depth, unique_queue
from tests.polling import wait_for
from tests.runner.client_requests import client_request, upload_blob, workspace_tar
from tests.runner.results import final_document, scrape_documents, tar_members
from tests.runner.workloads import TRAIN, workspace


@pytest.fixture
def queue() -> str:
    return unique_queue("rmq_e2e")


def test_studio_run_results_land_where_the_client_looks(
    studio_client, serve_runner, s3_client, services, queue, tmp_path
):
    runner = serve_runner()
    key = f"cli_{queue}"
    studio_client.run(workspace(tmp_path, TRAIN), queue, "train.py", "arg1", "--flag=2", "two words", key=key)

    document = wait_for(
        lambda: final_document(s3_client, studio_client.bucket, key), 240, "the scrape document"
    )
    bucket = studio_client.bucket
    output = tar_members(s3_client, bucket, f"experiments/{key}/output.tar")["./output"].decode()
    assert "arguments: ['arg1', '--flag=2', 'two words']" in output
    assert tar_members(s3_client, bucket, f"experiments/{key}/modeldir.tar") == {"./weights.txt": b"trained"}
    assert document["experiment"] == {"epoch": 2, "fitness": 0.75}
    studioml = document["studioml"]
    assert studioml["status"] == "succeeded" and studioml["exit_code"] == 0
    assert studioml["experiment"]["key"] == key
    assert set(studioml["artifacts"]) >= {"workspace", "output", "modeldir", "_metadata"}
    assert wait_for(lambda: queue_depth(services.amqp_management_url, queue) == 0, 10, "the ack")
    assert runner.process.poll() is None


COMPLETION_CLIENT = """\
import json, sys
from studio.completion_service.completion_service import CompletionService

config = {"queue": sys.argv[1], "resources_needed": {"cpus": 1, "ram": "1g", "hdd": "1g"}, "sleep_time": 1}
with CompletionService("cs" + sys.argv[1][-6:], cs_config=config, studio_config_file=sys.argv[2]) as cs:
    keys = {cs.submitTask(sys.argv[3], {"x": x}, job_id=f"job{x}"): x for x in (1, 2, 3)}
    results = {}
    while len(results) < 3:
        got = cs.getResultsWithTimeout(150)
        if got is None:
            break
        results[got[0]] = got[1]
print(json.dumps({"submitted": {k: v for k, v in keys.items()}, "results": results}))
"""

CLIENT_FUNCTION = """\
def clientFunction(args, files):
    return {"x": args["x"], "square": args["x"] ** 2}
"""


def test_completion_service_round_trip(studio_client, serve_runner, queue, tmp_path):
    serve_runner()
    function = tmp_path / "square.py"
    function.write_text(CLIENT_FUNCTION)
    script = COMPLETION_CLIENT.replace("sys.argv[1]", repr(queue)).replace(
        "sys.argv[2]", repr(str(studio_client.config))
    )
    script = script.replace("sys.argv[3]", repr(str(function)))
    result = studio_client.python(script, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected = {key: {"x": x, "square": x * x} for key, x in report["submitted"].items()}
    assert report["results"] == expected


def test_a_failing_script_is_retried_then_dead_lettered_with_its_output(
    studio_client, serve_runner, s3_client, services, queue, tmp_path
):
    serve_runner("--max-attempts", "2")
    key = f"fail_{queue}"
    studio_client.run(
        workspace(tmp_path, "raise SystemExit('diverged at epoch 3')\n"), queue, "train.py", key=key
    )

    dead = wait_for(lambda: dead_letters(services, queue), 240, "the dead letter")
    body, headers = dead[0]
    assert json.loads(body)["experiment"]["key"] == key
    assert "failed after 2 attempts" in headers["x-studio-reject-reason"]
    documents = scrape_documents(s3_client, studio_client.bucket, key)
    assert [d["studioml"]["status"] for d in documents] == ["failed", "failed"]
    assert all(d["studioml"]["exit_code"] == 1 for d in documents)
    output = tar_members(s3_client, studio_client.bucket, f"experiments/{key}/output.tar")[
        "./output"
    ].decode()
    assert "diverged at epoch 3" in output
    assert wait_for(lambda: queue_depth(services.amqp_management_url, queue) == 0, 10, "the ack")


def test_a_timed_out_script_is_killed_and_not_retried(
    studio_client, serve_runner, s3_client, services, queue, tmp_path
):
    serve_runner("--max-attempts", "3")
    key = f"slow_{queue}"
    script = "import time\nprint('starting', flush=True)\ntime.sleep(600)\n"
    studio_client.run(workspace(tmp_path, script), queue, "train.py", key=key, options=("--max-duration=3s",))

    dead = wait_for(lambda: dead_letters(services, queue), 240, "the dead letter")
    assert "max_duration" in dead[0][1]["x-studio-reject-reason"]
    (document,) = scrape_documents(s3_client, studio_client.bucket, key)
    assert document["studioml"]["status"] == "timed_out"
    assert (
        "starting"
        in tar_members(s3_client, studio_client.bucket, f"experiments/{key}/output.tar")["./output"].decode()
    )


def test_a_malformed_message_is_dead_lettered_and_does_not_block_the_queue(
    studio_client, serve_runner, s3_client, services, queue, tmp_path
):
    serve_runner()
    publish_like_client(services.amqp_url, queue, [b'{"experiment": {"key": ""}', b"not json at all"])
    key = f"after_{queue}"
    studio_client.run(workspace(tmp_path, TRAIN), queue, "train.py", key=key)

    assert wait_for(lambda: final_document(s3_client, studio_client.bucket, key), 240, "the valid experiment")
    dead = wait_for(lambda: dead_letters(services, queue), 30, "the dead letters")
    reasons = sorted(headers["x-studio-reject-reason"] for _body, headers in dead)
    assert len(reasons) == 2 and all("not JSON" in reason for reason in reasons)


def test_a_workspace_with_escaping_entries_is_refused_and_nothing_escapes(
    studio_client, serve_runner, s3_client, services, queue, tmp_path
):
    runner = serve_runner()
    blob = workspace_tar({"train.py": b"print('never runs')\n", "../escaped.txt": b"gotcha"})
    key = f"evil_{queue}"
    request = client_request(
        services, studio_client.bucket, key, upload_blob(s3_client, studio_client.bucket, blob)
    )
    publish_like_client(services.amqp_url, queue, [json.dumps(request).encode()])

    dead = wait_for(lambda: dead_letters(services, queue), 120, "the dead letter")
    assert "escape" in dead[0][1]["x-studio-reject-reason"] or ".." in dead[0][1]["x-studio-reject-reason"]
    output = tar_members(s3_client, studio_client.bucket, f"experiments/{key}/output.tar")[
        "./output"
    ].decode()
    assert "failed when downloading user data" in output
    assert not list(tmp_path.rglob("escaped.txt"))
    assert runner.process.poll() is None
