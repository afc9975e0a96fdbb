"""A workload that looks for its runner's secrets, and a scan of every place a secret could end up."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PROBE = """\
import json, os

print("PROBE-ENV " + json.dumps(dict(os.environ), sort_keys=True), flush=True)
parent = os.getppid()
try:
    with open(f"/proc/{parent}/environ", "rb") as environ:
        print("PROBE-PARENT-ENVIRON " + json.dumps(environ.read().decode("utf-8", "replace").split("\\0")), flush=True)
except OSError as error:
    print("PROBE-PARENT-ENVIRON-DENIED " + json.dumps({"errno": error.errno, "error": str(error)}), flush=True)
with open(f"/proc/{parent}/cmdline", "rb") as cmdline:
    print("PROBE-PARENT-CMDLINE " + json.dumps(cmdline.read().decode("utf-8", "replace").split("\\0")), flush=True)
print(json.dumps({"experiment": {"probe": "done"}}), flush=True)
"""
"""The workload: prints its whole environment, then tries its parent's (the runner's) environment and
command line, as a curious or malicious experiment would."""

PROBE_PREFIX = "PROBE-"


@dataclass(frozen=True)
class ProbeReport:
    env: dict[str, str]
    parent_environ: list[str] | None
    """None when reading it was refused."""
    parent_denied: dict[str, Any] | None
    parent_cmdline: list[str]


def probe_report(console: str) -> ProbeReport:
    """What the probe printed, from a console log (the ``output`` artifact or a task log)."""
    found: dict[str, Any] = {}
    for line in console.splitlines():
        for tag in (
            "PROBE-ENV",
            "PROBE-PARENT-ENVIRON",
            "PROBE-PARENT-ENVIRON-DENIED",
            "PROBE-PARENT-CMDLINE",
        ):
            marker = line.find(tag + " ")
            if marker >= 0 and tag not in found:
                found[tag] = json.loads(line[marker + len(tag) + 1 :])
    assert "PROBE-ENV" in found and "PROBE-PARENT-CMDLINE" in found, console[-3000:]
    return ProbeReport(
        env=found["PROBE-ENV"],
        parent_environ=found.get("PROBE-PARENT-ENVIRON"),
        parent_denied=found.get("PROBE-PARENT-ENVIRON-DENIED"),
        parent_cmdline=found["PROBE-PARENT-CMDLINE"],
    )


def leaks(sinks: Mapping[str, str], secrets: Mapping[str, str]) -> list[str]:
    """``"<secret> in <sink>: ...context..."`` for every secret value found in every sink's text."""
    found = []
    for sink, text in sinks.items():
        for name, value in secrets.items():
            at = text.find(value) if value else -1
            if at >= 0:
                context = text[max(0, at - 150) : at + len(value) + 30].replace(value, "<SECRET>")
                found.append(f"{name} in {sink}: ...{context}...")
    return found


def without_workload_lines(document: Any) -> Any:
    """A scrape document less the console lines the workload printed (``studioml.log`` entries), so
    what the runner itself wrote can be scanned for the experimenter's secrets the workload printed."""
    document = json.loads(json.dumps(document))
    log = document.get("studioml", {}).get("log")
    if isinstance(log, list):
        document["studioml"]["log"] = [
            entry for entry in log if PROBE_PREFIX not in str(entry.get("msg", ""))
        ]
    return document


def without_probe_lines(text: str) -> str:
    """A log less the lines that relay what the workload printed."""
    return "\n".join(line for line in text.splitlines() if PROBE_PREFIX not in line)
