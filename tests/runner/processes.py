"""A ``studio-runner serve`` process that tests and benchmarks start, stop and read the log of."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunnerProcess:
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def events(self) -> list[dict]:
        events = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events
