"""The Airflow plugin that puts the Studio view into the UI.

Registered twice on purpose: the ``airflow.plugins`` entry point (what Airflow loads under its
default, lazy provider discovery) and the provider info's ``plugins`` (read when
``[core] lazy_discover_providers`` is off; Airflow then skips the second copy by name).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_provider_studio.plugins.api import app

URL_PREFIX = "/studio"


class StudioViewPlugin(AirflowPlugin):
    """ENN campaigns: a tab on each DAG (its campaigns), and two on each DAG run (its campaign's
    chart and generation table; the generation's genomes)."""

    name = "studio"

    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "Studio view"}]

    external_views = [
        {
            "name": "Campaigns",
            "href": "studio/dags/{DAG_ID}/campaigns",
            "destination": "dag",
            "url_route": "studio-campaigns",
        },
        {
            "name": "Campaign",
            "href": "studio/dags/{DAG_ID}/runs/{RUN_ID}/campaign",
            "destination": "dag_run",
            "url_route": "studio-campaign",
        },
        {
            "name": "Genomes",
            "href": "studio/dags/{DAG_ID}/runs/{RUN_ID}/genomes",
            "destination": "dag_run",
            "url_route": "studio-genomes",
        },
    ]
