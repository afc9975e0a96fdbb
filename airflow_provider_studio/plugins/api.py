"""The Studio view's FastAPI app, mounted by Airflow's API server at ``/studio``.

``/studio/api/...`` answers JSON (paginated) and ``/studio/dags/...`` the pages the UI shows in
its tabs; both read through the same functions, so a page never shows what the API would refuse.
Every route names its DAG in the path and depends on Airflow's own ``requires_access_dag``: the
auth manager decides, from the caller's token (header or the UI's cookie), whether they may read
that DAG's runs. S3 is read with the DAG's AWS connection inside the server; no credential, and
no endpoint secret, is ever part of an answer.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from sqlalchemy import select

from airflow_provider_studio.plugins import pages
from airflow_provider_studio.plugins.campaigns import (
    TRAIN_TASK,
    Campaign,
    CampaignNotFound,
    CampaignStore,
    DocumentError,
    Experiment,
    Generation,
    GenerationRun,
    GenomeLinks,
    GenomeRow,
    campaigns_of,
    generation_runs,
    genome_summary,
)

DEFAULT_AWS_CONN_ID = "aws_default"
MAX_PAGE = 500


def _can_read_runs() -> Any:
    """Airflow's check that the caller may read this DAG's runs (``dag_id`` from the path)."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    return Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN))


def _session() -> Any:
    from airflow.api_fastapi.common.db.common import _get_session

    return Depends(_get_session)


app = FastAPI(
    title="Studio view",
    description="ENN campaigns run by the StudioML provider: generations, genomes and experiments.",
    dependencies=[_can_read_runs()],
)
Session = Annotated[Any, _session()]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description="items per page")]
Offset = Annotated[int, Query(ge=0, description="items to skip")]


class Page(BaseModel):
    total_entries: int
    offset: int
    limit: int


class CampaignPage(Page):
    campaigns: list[Campaign]


class GenerationPage(Page):
    campaign: str
    generations: list[Generation]


class GenomePage(Page):
    campaign: str
    generation: int
    run_id: str
    genomes: list[GenomeRow]


# --- reading ----------------------------------------------------------------------------------


def _aws_conn_id() -> str:
    from airflow.configuration import conf

    return conf.get("studio", "campaign_aws_conn_id", fallback=DEFAULT_AWS_CONN_ID) or DEFAULT_AWS_CONN_ID


def _store(bucket: str, campaign: str) -> CampaignStore:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return CampaignStore(S3Hook(aws_conn_id=_aws_conn_id()), bucket, campaign)


def _runs(session: Any, dag_id: str, run_id: str | None = None) -> list[GenerationRun]:
    from airflow.models.dagrun import DagRun

    query = select(DagRun.run_id, DagRun.conf, DagRun.state).where(DagRun.dag_id == dag_id)
    if run_id is not None:
        query = query.where(DagRun.run_id == run_id)
    return generation_runs([tuple(row) for row in session.execute(query).all()])


def _campaign_runs(session: Any, dag_id: str, campaign: str) -> list[GenerationRun]:
    runs = [run for run in _runs(session, dag_id) if run.campaign == campaign]
    if not runs:
        raise HTTPException(
            404, f"campaign {campaign!r} not found: no run of DAG {dag_id!r} has it in its conf"
        )
    return runs


def _generation_run(session: Any, dag_id: str, run_id: str) -> GenerationRun:
    runs = _runs(session, dag_id, run_id)
    if not runs:
        raise HTTPException(
            404,
            f"run {run_id!r} of DAG {dag_id!r} is not an ENN generation "
            "(it does not exist, or its conf has no campaign, generation and bucket)",
        )
    return runs[0]


def list_campaigns(session: Any, dag_id: str, limit: int, offset: int) -> CampaignPage:
    found = campaigns_of(_runs(session, dag_id))
    return CampaignPage(
        total_entries=len(found), offset=offset, limit=limit, campaigns=found[offset : offset + limit]
    )


def list_generations(session: Any, dag_id: str, campaign: str, limit: int, offset: int) -> GenerationPage:
    runs = _campaign_runs(session, dag_id, campaign)
    generations = sorted({run.generation for run in runs})
    wanted = set(generations[offset : offset + limit])
    rows = _store(runs[0].bucket, campaign).generations([r for r in runs if r.generation in wanted])
    return GenerationPage(
        total_entries=len(generations), offset=offset, limit=limit, campaign=campaign, generations=rows
    )


def list_genomes(
    request: Request, session: Any, dag_id: str, run_id: str, limit: int, offset: int
) -> GenomePage:
    run = _generation_run(session, dag_id, run_id)
    store = _store(run.bucket, run.campaign)
    try:
        population, table = store.genomes(run)
    except CampaignNotFound as error:
        raise HTTPException(404, str(error)) from None
    except DocumentError as error:
        raise HTTPException(502, f"the generation's population cannot be read: {error}") from None
    from airflow_provider_studio.links.experiment import artifacts_url

    rows = []
    for map_index in range(offset, min(offset + limit, len(population))):
        genome = population[map_index] if isinstance(population[map_index], dict) else {}
        genome_id = str(genome.get("genome_id", "?"))
        key = f"enn-{run.campaign}-g{run.generation:03d}-{genome_id}"
        row = table.get(key)
        fitness = row.get("experiment.fitness") if row else None
        rows.append(
            GenomeRow(
                map_index=map_index,
                experiment_key=key,
                genome_id=genome_id,
                summary=genome_summary(genome),
                born=genome.get("generation"),
                fitness=fitness if isinstance(fitness, (int, float)) else None,
                status=str(row.get("status")) if row else "not collected",
                duration_seconds=row.get("experiment.train_seconds") if row else None,
                parents=[str(parent) for parent in genome.get("parents") or []],
                links=_links(request, dag_id, run_id, map_index, key, run.bucket, artifacts_url),
                error=row.get("error") if row else None,
            )
        )
    return GenomePage(
        total_entries=len(population),
        offset=offset,
        limit=limit,
        campaign=run.campaign,
        generation=run.generation,
        run_id=run_id,
        genomes=rows,
    )


def read_experiment(session: Any, dag_id: str, run_id: str, key: str) -> Experiment:
    run = _generation_run(session, dag_id, run_id)
    if not key.startswith(f"enn-{run.campaign}-g{run.generation:03d}-"):
        raise HTTPException(404, f"experiment {key!r} is not one of run {run_id!r}'s genomes")
    return _store(run.bucket, run.campaign).experiment(run, key)


def _links(
    request: Request, dag_id: str, run_id: str, map_index: int, key: str, bucket: str, artifacts_url: Any
) -> GenomeLinks:
    ui = _ui_base()
    task = f"{ui}/dags/{quote(dag_id)}/runs/{quote(run_id)}/tasks/{TRAIN_TASK}/mapped/{map_index}"
    studio = request.scope.get("root_path", "")
    return GenomeLinks(
        task_instance=task,
        log=task,  # the task instance page opens on its log, where the runner relays ``output``
        artifacts=artifacts_url(bucket, key, _aws_conn_id()) or None,
        experiment=f"{studio}/dags/{quote(dag_id)}/runs/{quote(run_id)}/experiments/{quote(key)}",
    )


def _ui_base() -> str:
    """The Airflow UI's path prefix (empty unless ``[api] base_url`` has a path)."""
    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


# --- JSON -------------------------------------------------------------------------------------


@app.get("/api/dags/{dag_id}/campaigns")
def campaigns_api(dag_id: str, session: Session, limit: Limit = 100, offset: Offset = 0) -> CampaignPage:
    """The DAG's campaigns, the most recent first."""
    return list_campaigns(session, dag_id, limit, offset)


@app.get("/api/dags/{dag_id}/campaigns/{campaign}/generations")
def generations_api(
    dag_id: str, campaign: str, session: Session, limit: Limit = 100, offset: Offset = 0
) -> GenerationPage:
    """The campaign's generations, oldest first: fitness, size, failures, wall time, overhead."""
    return list_generations(session, dag_id, campaign, limit, offset)


@app.get("/api/dags/{dag_id}/runs/{run_id}/genomes")
def genomes_api(
    request: Request, dag_id: str, run_id: str, session: Session, limit: Limit = 100, offset: Offset = 0
) -> GenomePage:
    """One generation's genomes in ``train``'s map order, with their parents and links."""
    return list_genomes(request, session, dag_id, run_id, limit, offset)


@app.get("/api/dags/{dag_id}/runs/{run_id}/experiments/{key}")
def experiment_api(dag_id: str, run_id: str, key: str, session: Session) -> Experiment:
    """One experiment's scrape document (runner, experiment, studioml) and its output's tail."""
    return read_experiment(session, dag_id, run_id, key)


# --- pages ------------------------------------------------------------------------------------


@app.get("/dags/{dag_id}/campaigns", response_class=HTMLResponse)
def campaigns_page(request: Request, dag_id: str, session: Session, offset: Offset = 0) -> str:
    page = list_campaigns(session, dag_id, 100, offset)
    return pages.campaigns(request.scope.get("root_path", ""), dag_id, page.campaigns, page.total_entries)


@app.get("/dags/{dag_id}/runs/{run_id}/campaign", response_class=HTMLResponse)
def run_campaign_page(request: Request, dag_id: str, run_id: str, session: Session) -> str:
    """The campaign page of the campaign this run belongs to (the DAG run's tab)."""
    run = _generation_run(session, dag_id, run_id)
    return campaign_page(request, dag_id, run.campaign, session)


@app.get("/dags/{dag_id}/campaigns/{campaign}", response_class=HTMLResponse)
def campaign_page(request: Request, dag_id: str, campaign: str, session: Session) -> str:
    page = list_generations(session, dag_id, campaign, MAX_PAGE, 0)
    return pages.campaign(request.scope.get("root_path", ""), dag_id, campaign, page.generations)


@app.get("/dags/{dag_id}/runs/{run_id}/genomes", response_class=HTMLResponse)
def genomes_page(
    request: Request, dag_id: str, run_id: str, session: Session, limit: Limit = 100, offset: Offset = 0
) -> str:
    page = list_genomes(request, session, dag_id, run_id, limit, offset)
    return pages.genomes(request.scope.get("root_path", ""), dag_id, page)


@app.get("/dags/{dag_id}/runs/{run_id}/experiments/{key}", response_class=HTMLResponse)
def experiment_page(request: Request, dag_id: str, run_id: str, key: str, session: Session) -> str:
    return pages.experiment(
        request.scope.get("root_path", ""), dag_id, read_experiment(session, dag_id, run_id, key)
    )
