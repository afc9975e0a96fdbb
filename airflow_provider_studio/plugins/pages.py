"""The Studio view's pages: server-rendered HTML with the fitness chart drawn as inline SVG.

No JavaScript bundle and no build step: the Airflow UI shows these pages in its tabs (an iframe
on the same origin, so the UI's session cookie comes along), and each page is one request.
Every value from S3 or a DAG run's conf is escaped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from html import escape
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from airflow_provider_studio.plugins.api import GenomePage
    from airflow_provider_studio.plugins.campaigns import Campaign, Experiment, Generation

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#1a202c;background:#fff}
h1{font-size:20px;margin:0 0 12px} h2{font-size:16px;margin:20px 0 8px}
table{border-collapse:collapse;width:100%} th,td{border-bottom:1px solid #e2e8f0;padding:4px 8px;text-align:left}
th{background:#f7fafc;font-weight:600} td.n{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#c53030} .muted{color:#718096} a{color:#2b6cb0} pre{background:#f7fafc;padding:8px;overflow:auto;max-height:480px}
svg text{font:12px system-ui,sans-serif} .legend span{margin-right:16px}
"""
SERIES = (
    ("best_fitness", "best", "#2f855a"),
    ("mean_fitness", "mean", "#2b6cb0"),
    ("worst_fitness", "worst", "#c53030"),
)


def _page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )


def _num(value: float | None, digits: int = 4) -> str:
    return "&ndash;" if value is None else f"{value:.{digits}f}"


def campaigns(root: str, dag_id: str, found: Sequence[Campaign], total: int) -> str:
    rows = "".join(
        f"<tr><td><a href='{root}/dags/{quote(dag_id)}/campaigns/{quote(c.name)}'>{escape(c.name)}</a></td>"
        f"<td class=n>{c.generations}</td><td>{escape(c.state or '')}</td><td>{escape(c.bucket)}</td></tr>"
        for c in found
    )
    body = f"<h1>ENN campaigns of {escape(dag_id)}</h1>" + (
        "<table><tr><th>campaign</th><th>generations</th><th>last run</th><th>bucket</th></tr>"
        f"{rows}</table><p class=muted>{total} campaigns</p>"
        if found
        else "<p class=muted>No run of this DAG names a campaign in its conf.</p>"
    )
    return _page(f"Campaigns of {dag_id}", body)


def campaign(root: str, dag_id: str, name: str, generations: Sequence[Generation]) -> str:
    rows = "".join(
        f"<tr data-generation='{g.generation}'><td class=n>{g.generation}</td>"
        f"<td><a href='{root}/dags/{quote(dag_id)}/runs/{quote(g.run_id)}/genomes'>{escape(g.run_id)}</a></td>"
        f"<td>{escape(g.state or '')}</td><td class=n>{g.size if g.size is not None else '&ndash;'}</td>"
        f"<td class=n>{g.failures if g.failures is not None else '&ndash;'}</td>"
        + "".join(f"<td class='n {key}'>{_num(getattr(g, key))}</td>" for key, _, _ in SERIES)
        + f"<td class=n>{_num(g.wall_seconds, 1)}</td><td class=n>{_num(g.overhead_seconds, 1)}</td>"
        f"<td class=bad>{escape(g.error or '')}</td></tr>"
        for g in generations
    )
    body = (
        f"<h1>Campaign {escape(name)}</h1>{chart(generations)}"
        "<h2>Generations</h2><table id=generations><tr><th>generation</th><th>DAG run</th><th>state</th>"
        "<th>genomes</th><th>failed</th><th>best</th><th>mean</th><th>worst</th><th>wall s</th>"
        f"<th>overhead s</th><th></th></tr>{rows}</table>"
    )
    return _page(f"Campaign {name}", body)


def chart(generations: Sequence[Generation], width: int = 640, height: int = 280) -> str:
    """Best, mean and worst fitness by generation as an SVG line chart (points carry their values)."""
    scored = [g for g in generations if g.best_fitness is not None]
    if not scored:
        return "<p class=muted>No generation has been scored yet.</p>"
    left, right, top, bottom = 56, 16, 16, 36
    values = [getattr(g, key) for g in scored for key, _, _ in SERIES if getattr(g, key) is not None]
    low, high = min(values), max(values)
    if high - low < 1e-9:
        low, high = low - 0.05, high + 0.05
    first, last = scored[0].generation, scored[-1].generation
    span = max(1, last - first)

    def x(generation: int) -> float:
        return left + (generation - first) / span * (width - left - right)

    def y(value: float) -> float:
        return top + (high - value) / (high - low) * (height - top - bottom)

    parts = [
        f"<svg id=fitness-chart xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"role='img' aria-label='fitness by generation'>",
        f"<line x1='{left}' y1='{height - bottom}' x2='{width - right}' y2='{height - bottom}' stroke='#a0aec0'/>",
        f"<line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' stroke='#a0aec0'/>",
    ]
    for step in range(5):
        value = low + (high - low) * step / 4
        parts.append(
            f"<text x='{left - 6}' y='{y(value) + 4:.1f}' text-anchor='end'>{value:.3f}</text>"
            f"<line x1='{left}' y1='{y(value):.1f}' x2='{width - right}' y2='{y(value):.1f}' stroke='#edf2f7'/>"
        )
    for g in scored:
        parts.append(
            f"<text x='{x(g.generation):.1f}' y='{height - bottom + 16}' text-anchor='middle'>{g.generation}</text>"
        )
    parts.append(f"<text x='{(left + width) / 2}' y='{height - 4}' text-anchor='middle'>generation</text>")
    for key, label, colour in SERIES:
        points = [(g.generation, getattr(g, key)) for g in scored if getattr(g, key) is not None]
        path = " ".join(f"{x(gen):.1f},{y(val):.1f}" for gen, val in points)
        parts.append(
            f"<polyline class='series-{label}' fill='none' stroke='{colour}' stroke-width='2' points='{path}'/>"
        )
        parts.extend(
            f"<circle class='point-{label}' data-generation='{gen}' data-value='{val:.4f}' cx='{x(gen):.1f}' "
            f"cy='{y(val):.1f}' r='3.5' fill='{colour}'><title>{label} {val:.4f} (generation {gen})</title></circle>"
            for gen, val in points
        )
    parts.append("</svg>")
    legend = "".join(f"<span style='color:{c}'>&#9632; {label}</span>" for _, label, c in SERIES)
    return "".join(parts) + f"<div class=legend>{legend}</div>"


def genomes(root: str, dag_id: str, page: GenomePage) -> str:
    rows = []
    for g in page.genomes:
        parents = ", ".join(escape(p) for p in g.parents) or "<span class=muted>random</span>"
        links = (
            f"<a target=_top href='{escape(g.links.task_instance)}'>task</a> · "
            f"<a target=_top href='{escape(g.links.log)}'>log</a> · "
            f"<a href='{escape(g.links.experiment)}'>output</a>"
            + (
                f" · <a target=_blank href='{escape(g.links.artifacts)}'>artifacts</a>"
                if g.links.artifacts
                else ""
            )
        )
        status_class = "" if g.status == "succeeded" else " class=bad"
        rows.append(
            f"<tr data-key='{escape(g.experiment_key)}'><td class=n>{g.map_index}</td>"
            f"<td>{escape(g.experiment_key)}</td><td>{escape(g.summary)}</td>"
            f"<td class='n fitness'>{_num(g.fitness)}</td><td{status_class}>{escape(g.status)}</td>"
            f"<td class=n>{_num(g.duration_seconds, 1)}</td><td class=parents>{parents}</td><td>{links}</td></tr>"
        )
    pager = ""
    base = f"{root}/dags/{quote(dag_id)}/runs/{quote(page.run_id)}/genomes?limit={page.limit}"
    if page.offset > 0:
        pager += f"<a href='{base}&offset={max(0, page.offset - page.limit)}'>previous</a> "
    if page.offset + page.limit < page.total_entries:
        pager += f"<a href='{base}&offset={page.offset + page.limit}'>next</a>"
    body = (
        f"<h1>Generation {page.generation} of <a href='{root}/dags/{quote(dag_id)}/campaigns/{quote(page.campaign)}'>"
        f"{escape(page.campaign)}</a></h1>"
        f"<p id=genome-count>{page.total_entries} genomes (showing {page.offset + 1}&ndash;"
        f"{page.offset + len(page.genomes)})</p>"
        "<table id=genomes><tr><th>#</th><th>experiment key</th><th>genome</th><th>fitness</th><th>status</th>"
        f"<th>train s</th><th>parents</th><th>links</th></tr>{''.join(rows)}</table><p>{pager}</p>"
    )
    return _page(f"Generation {page.generation} of {page.campaign}", body)


def experiment(root: str, dag_id: str, view: Experiment) -> str:
    blocks = "".join(
        f"<h2>{name}</h2><pre>{escape(json.dumps(block, indent=2, default=str))}</pre>"
        for name, block in (
            ("runner", view.runner),
            ("experiment", view.experiment),
            ("studioml", view.studioml),
        )
        if block is not None
    )
    scrape = f"<p class='bad scrape-error'>{escape(view.scrape_error)}</p>" if view.scrape_error else blocks
    output = (
        f"<p class=bad>{escape(view.output_error)}</p>"
        if view.output_error
        else f"<pre id=output>{escape(chr(10).join(view.output_tail))}</pre>"
    )
    body = (
        f"<p><a href='{root}/dags/{quote(dag_id)}/runs/{quote(view.run_id)}/genomes'>&larr; generation</a></p>"
        f"<h1>Experiment {escape(view.experiment_key)}</h1><p>status: {escape(view.status or 'unknown')} · "
        f"scrape document: {escape(view.scrape_uri or '&ndash;')}</p>{scrape}<h2>output (last lines)</h2>{output}"
    )
    return _page(f"Experiment {view.experiment_key}", body)
