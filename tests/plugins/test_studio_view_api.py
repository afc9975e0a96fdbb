"""The Studio view's API through Airflow's own API app: real auth manager, real SQLite, real S3.

A campaign is written as the DAG leaves one (``tests/studio_campaign.py``); the requests carry
tokens the simple auth manager issued, so access is decided exactly as in a deployment.
"""

from __future__ import annotations

import json
import uuid

import pytest

from tests.studio_campaign import DAG_ID, record_runs, write_campaign

USERS = "viewer:viewer,nobody:"
"""``nobody`` has no role: the auth manager lets it read nothing."""


@pytest.fixture(scope="module")
def airflow_app(services, airflow_db):
    import os

    aws = {
        "conn_type": "aws",
        "login": services.s3_access_key,
        "password": services.s3_secret_key,
        "extra": {"endpoint_url": services.s3_endpoint, "region_name": services.region},
    }
    saved = dict(os.environ)
    os.environ.update(
        {
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(aws),
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": USERS,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        }
    )
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    app = create_app(apps="core")
    with TestClient(app) as client:
        yield client, app
    os.environ.clear()
    os.environ.update(saved)


def token(app, username: str, role: str | None) -> dict[str, str]:
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    user = SimpleAuthManagerUser(username=username, role=role)
    return {"Authorization": f"Bearer {app.state.auth_manager.generate_jwt(user)}"}


@pytest.fixture(scope="module")
def campaign(airflow_app, s3_client):
    name = f"c{uuid.uuid4().hex[:8]}"
    bucket = f"t-{uuid.uuid4().hex[:20]}"
    s3_client.create_bucket(Bucket=bucket)
    runs = write_campaign(s3_client, bucket, name, [5, 7])
    record_runs(runs)
    return {"name": name, "bucket": bucket, "runs": runs}


def get(airflow_app, path: str, role: str | None = "viewer", **params):
    client, app = airflow_app
    return client.get(f"/studio{path}", params=params, headers=token(app, role or "nobody", role))


def test_generations_carry_the_summaries(airflow_app, campaign):
    answer = get(airflow_app, f"/api/dags/{DAG_ID}/campaigns/{campaign['name']}/generations")
    assert answer.status_code == 200, answer.text
    page = answer.json()
    assert page["total_entries"] == 2
    for row, run in zip(page["generations"], campaign["runs"], strict=True):
        assert row["run_id"] == run["run_id"]
        assert row["size"] == len(run["genomes"])
        assert row["best_fitness"] == max(run["fitness"])
        assert row["worst_fitness"] == min(run["fitness"])
        assert row["overhead_seconds"] == pytest.approx(30.0 - 1.5)
    listed = get(airflow_app, f"/api/dags/{DAG_ID}/campaigns").json()
    assert campaign["name"] in [c["name"] for c in listed["campaigns"]]


def test_genomes_are_paginated_with_parents_and_links(airflow_app, campaign):
    run = campaign["runs"][1]
    seen = []
    for offset in (0, 3, 6):
        page = get(
            airflow_app, f"/api/dags/{DAG_ID}/runs/{run['run_id']}/genomes", limit=3, offset=offset
        ).json()
        assert page["total_entries"] == 7 and page["offset"] == offset
        seen.extend(page["genomes"])
    assert [g["map_index"] for g in seen] == list(range(7))
    assert [g["genome_id"] for g in seen] == [g["genome_id"] for g in run["genomes"]]
    assert all(g["parents"] == run["genomes"][0]["parents"] for g in seen) and seen[0]["parents"]
    assert [g["fitness"] for g in seen] == run["fitness"]
    first = seen[0]["links"]
    assert first["task_instance"].endswith(f"/dags/{DAG_ID}/runs/{run['run_id']}/tasks/train/mapped/0")
    assert first["experiment"].startswith("/studio/dags/")
    too_big = get(airflow_app, f"/api/dags/{DAG_ID}/runs/{run['run_id']}/genomes", limit=10_000)
    assert too_big.status_code == 422


def test_a_missing_campaign_is_404_with_a_reason(airflow_app, campaign):
    answer = get(airflow_app, f"/api/dags/{DAG_ID}/campaigns/no-such-campaign/generations")
    assert answer.status_code == 404
    assert "no-such-campaign" in answer.json()["detail"] and "not found" in answer.json()["detail"]
    page = get(airflow_app, f"/dags/{DAG_ID}/campaigns/no-such-campaign")
    assert page.status_code == 404


def test_an_experiment_shows_its_scrape_blocks_and_output(airflow_app, campaign):
    run = campaign["runs"][0]
    key = f"enn-{campaign['name']}-g000-{run['genomes'][2]['genome_id']}"
    view = get(airflow_app, f"/api/dags/{DAG_ID}/runs/{run['run_id']}/experiments/{key}").json()
    assert view["experiment"]["fitness"] == run["fitness"][2]
    assert view["runner"]["exit_code"] == 0 and view["studioml"]["experiment"]["key"] == key
    assert view["output_tail"][-1] == f"fitness {run['fitness'][2]}"
    assert view["scrape_error"] is None


def test_a_corrupt_scrape_document_is_shown_as_such(airflow_app, campaign, s3_client):
    run = campaign["runs"][0]
    key = f"enn-{campaign['name']}-g000-{run['genomes'][4]['genome_id']}"
    s3_client.put_object(
        Bucket=campaign["bucket"], Key=f"metadata/scrape-host-test-{key}.json", Body=b"{not json"
    )
    view = get(airflow_app, f"/api/dags/{DAG_ID}/runs/{run['run_id']}/experiments/{key}").json()
    assert view["scrape_error"].startswith("corrupt scrape document") and view["experiment"] is None
    assert view["output_tail"], "the output is still shown"
    page = get(airflow_app, f"/dags/{DAG_ID}/runs/{run['run_id']}/experiments/{key}")
    assert page.status_code == 200 and "corrupt scrape document" in page.text


def test_no_credentials_in_any_response(airflow_app, campaign, services):
    run = campaign["runs"][1]
    key = f"enn-{campaign['name']}-g001-{run['genomes'][0]['genome_id']}"
    paths = [
        f"/api/dags/{DAG_ID}/campaigns",
        f"/api/dags/{DAG_ID}/campaigns/{campaign['name']}/generations",
        f"/api/dags/{DAG_ID}/runs/{run['run_id']}/genomes",
        f"/api/dags/{DAG_ID}/runs/{run['run_id']}/experiments/{key}",
        f"/dags/{DAG_ID}/campaigns/{campaign['name']}",
        f"/dags/{DAG_ID}/runs/{run['run_id']}/genomes",
        f"/dags/{DAG_ID}/runs/{run['run_id']}/experiments/{key}",
    ]
    for path in paths:
        answer = get(airflow_app, path)
        assert answer.status_code == 200, (path, answer.text)
        assert services.s3_secret_key not in answer.text and services.s3_access_key not in answer.text, path


def test_a_user_who_cannot_read_the_dag_gets_no_data(airflow_app, campaign):
    client, _ = airflow_app
    run = campaign["runs"][0]
    for path in (
        f"/api/dags/{DAG_ID}/campaigns/{campaign['name']}/generations",
        f"/api/dags/{DAG_ID}/runs/{run['run_id']}/genomes",
        f"/dags/{DAG_ID}/campaigns/{campaign['name']}",
    ):
        refused = get(airflow_app, path, role=None)
        assert refused.status_code == 403, path
        assert campaign["name"] not in refused.text and str(run["fitness"][0]) not in refused.text
        assert client.get(f"/studio{path}").status_code == 401, "no token, no data"
