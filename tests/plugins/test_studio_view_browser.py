"""The Studio view in a browser: real Airflow (standalone) runs a 2-generation campaign with the
provider installed, then headless chromium loads the campaign page and a generation's tab.

Screenshots are kept in ``.local/test-artifacts/studio-view/`` (docs/studio-view.png is one).
"""

from __future__ import annotations

import argparse
import json
import re
import urllib.error
import urllib.request
from urllib.parse import quote

import pytest

from devtools import demo
from devtools.local_airflow import LocalAirflow
from devtools.services import REPO as REPO_ROOT
from devtools.services import free_port
from tests.chromium import dump_dom, screenshot

ARTIFACTS = REPO_ROOT / ".local" / "test-artifacts" / "studio-view"
DAG_ID = demo.DAG_ID
POPULATION = 3


@pytest.fixture(scope="module")
def airflow(service_set, airflow_db, tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-ui")
    patch = pytest.MonkeyPatch()
    patch.delenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")  # its own SQLite in its home
    patch.setenv("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
    patch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "studio-view-test-secret-" + "x" * 48)
    server = LocalAirflow(home=home, endpoints=service_set.endpoints, port=free_port())
    server.migrate()
    server.start()
    yield server
    server.stop()
    patch.undo()


def s3_lines(s3, key: str) -> list[dict]:
    body = s3.get_object(Bucket=demo.BUCKET, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def logged_in(airflow: LocalAirflow, path: str) -> str:
    """The URL that signs in (every user is an admin here) and lands on ``path``."""
    return f"{airflow.url}/auth/token/login?next={quote(airflow.url + path, safe='')}"


def test_the_campaign_and_a_generation_in_chromium(airflow, service_set):
    airflow.wait_for_dag(DAG_ID)
    airflow.api("PATCH", f"/dags/{DAG_ID}", {"is_paused": False})
    args = argparse.Namespace(generations=2, population=POPULATION, epochs=1, seed=3, generation_timeout=1200)
    summaries = demo.run_campaign(airflow, service_set, args, remember=False)
    assert [s["generation"] for s in summaries] == [0, 1]
    campaign = summaries[0]["run_id"].rsplit("-gen-", 1)[0]
    s3 = service_set.endpoints.s3_client()
    population1 = json.loads(
        s3.get_object(Bucket=demo.BUCKET, Key=f"enn/{campaign}/generation-001/population.json")["Body"].read()
    )
    table1 = s3_lines(s3, f"enn/{campaign}/generation-001/table.jsonl")

    campaign_path = f"/studio/dags/{DAG_ID}/campaigns/{campaign}"
    dom = dump_dom(logged_in(airflow, campaign_path))
    for summary in summaries:  # the chart's points and the table's cells are this run's values
        best = f"{summary['best_fitness']:.4f}"
        assert re.search(
            rf"class=\"point-best\" data-generation=\"{summary['generation']}\" data-value=\"{best}\"", dom
        ), dom[-3000:]
        row = re.search(rf"<tr data-generation=\"{summary['generation']}\">(.*?)</tr>", dom).group(1)
        assert f">{best}<" in row and f">{summary['mean_fitness']:.4f}<" in row
        assert f'<td class="n">{summary["experiments"]}</td>' in row
    screenshot(logged_in(airflow, campaign_path), ARTIFACTS / "campaign.png")

    run_id = summaries[1]["run_id"]
    genomes_path = f"/studio/dags/{DAG_ID}/runs/{run_id}/genomes"
    dom = dump_dom(logged_in(airflow, genomes_path))
    assert f"{POPULATION} genomes" in dom
    rows = re.findall(r"<tr data-key=\"([^\"]+)\">(.*?)</tr>", dom)
    assert len(rows) == POPULATION
    fitness = {row["key"]: row["experiment.fitness"] for row in table1}
    for (key, cells), genome in zip(rows, population1, strict=True):
        assert key.endswith(genome["genome_id"])
        parents = re.search(r"<td class=\"parents\">(.*?)</td>", cells).group(1)
        assert parents == (", ".join(genome["parents"]) or '<span class="muted">random</span>'), (
            "lineage from breed"
        )
        assert f">{fitness[key]:.4f}<" in cells
    assert any(genome["parents"] for genome in population1), "generation 1 has bred children"
    screenshot(logged_in(airflow, genomes_path), ARTIFACTS / "genomes.png", size="1400,600")
    # the tab inside Airflow's own UI, as a user finds it (the README's picture)
    ui_tab = f"/dags/{DAG_ID}/runs/{summaries[0]['run_id']}/plugin/studio-campaign"
    screenshot(logged_in(airflow, ui_tab), ARTIFACTS / "airflow-tab.png", size="1400,900", budget_ms=20000)

    # a user whose role reads no DAG gets no data (this loopback Airflow signs every browser in
    # as an admin, [core] simple_auth_manager_all_admins, so the refusal is shown with a token)
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    token = SimpleAuthManager().generate_jwt(SimpleAuthManagerUser(username="nobody", role=None))
    request = urllib.request.Request(
        f"{airflow.url}/studio/api/dags/{DAG_ID}/campaigns/{campaign}/generations",
        headers={"Authorization": f"Bearer {token}"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 403 and campaign not in refused.value.read().decode()
