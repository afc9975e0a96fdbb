"""How long the Studio view's pages take to load on the demo's data.

Run the demo and leave Airflow up, then time each page the way the UI's tab fetches it (one
server-rendered request; the chart is inline SVG, so there is nothing else to load), plus a full
headless-chromium load of the campaign page:

    make demo DEMO_ARGS="--keep-running"      # or a campaign already run, with `make ui`
    .venv/bin/python bench/studio_view_load.py [--url http://127.0.0.1:28080] [--campaign NAME] [--repeat 5]

Prints the median and the slowest of ``--repeat`` loads for each page; the target is under 2 s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools.demo import DAG_ID, LAST_CAMPAIGN
from devtools.local_airflow import API_PORT
from devtools.system import ensure


def token(url: str) -> str:
    with urllib.request.urlopen(f"{url}/auth/token", timeout=30) as answer:
        return json.loads(answer.read())["access_token"]


def timed_get(url: str, bearer: str) -> tuple[float, int]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {bearer}"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as answer:
        size = len(answer.read())
    return time.perf_counter() - started, size


def chromium_load(url: str) -> float:
    """Wall time of a headless chromium that signs in and dumps the loaded page (startup included)."""
    with tempfile.TemporaryDirectory() as profile:
        started = time.perf_counter()
        subprocess.run(
            [ensure("chromium", "chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True, check=True, timeout=120,
        )  # fmt: skip
        return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=f"http://127.0.0.1:{API_PORT}")
    parser.add_argument("--campaign", default=None, help="default: the last demo's campaign")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    campaign = args.campaign or (LAST_CAMPAIGN.read_text().strip() if LAST_CAMPAIGN.exists() else None)
    if not campaign:
        parser.error("no --campaign and no demo campaign recorded; run make demo first")
    bearer = token(args.url)
    studio = f"{args.url}/studio"
    generations = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(
                f"{studio}/api/dags/{DAG_ID}/campaigns/{campaign}/generations",
                headers={"Authorization": f"Bearer {bearer}"},
            ),
            timeout=60,
        ).read()
    )["generations"]
    last = generations[-1]["run_id"]
    pages = {
        "campaign page": f"{studio}/dags/{DAG_ID}/campaigns/{campaign}",
        "generation tab (genomes)": f"{studio}/dags/{DAG_ID}/runs/{last}/genomes",
        "generations API": f"{studio}/api/dags/{DAG_ID}/campaigns/{campaign}/generations",
        "genomes API": f"{studio}/api/dags/{DAG_ID}/runs/{last}/genomes",
    }
    print(f"campaign {campaign}: {len(generations)} generations; {args.repeat} loads each from {args.url}")
    for name, url in pages.items():
        times, size = [], 0
        for _ in range(args.repeat):
            seconds, size = timed_get(url, bearer)
            times.append(seconds)
        print(
            f"{name:>26}: median {statistics.median(times) * 1000:7.1f} ms, slowest {max(times) * 1000:7.1f} ms, {size} bytes"
        )
    login = f"{args.url}/auth/token/login?next={quote(pages['campaign page'], safe='')}"
    loads = [chromium_load(login) for _ in range(min(3, args.repeat))]
    print(
        f"{'chromium, campaign page':>26}: median {statistics.median(loads) * 1000:7.1f} ms (browser start included)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
