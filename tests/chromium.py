"""Headless Debian chromium for tests that look at a page as a person's browser shows it."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from devtools.system import ensure

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def _run(url: str, *extra: str, budget_ms: int = 5000, timeout: float = 180) -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        result = subprocess.run(
            [
                ensure("chromium", "chromium"),
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}",
                *extra,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=profile,
        )
    if result.returncode != 0:
        raise RuntimeError(f"chromium failed on {url} ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def dump_dom(url: str, budget_ms: int = 5000) -> str:
    """The page's DOM after its scripts ran (a fresh profile: no cookies but those the URL sets)."""
    return _run(url, "--dump-dom", budget_ms=budget_ms)


def screenshot(url: str, path: Path, size: str = "1280,900", budget_ms: int = 5000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(url, f"--screenshot={path}", f"--window-size={size}", budget_ms=budget_ms)
    if not path.exists() or path.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot of {url} to {path}")
    return path
