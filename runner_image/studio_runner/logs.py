"""Runner logging: one JSON event per line, with the experiment and queue on every line.

Log collectors (Loki, CloudWatch, Elasticsearch) index JSON fields directly, and a runner that
serves several queues at once is unreadable without the experiment key on each line. The key
and queue live in context variables set by the thread that handles one message.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator

_experiment: contextvars.ContextVar[str | None] = contextvars.ContextVar("experiment", default=None)
_queue: contextvars.ContextVar[str | None] = contextvars.ContextVar("queue", default=None)


@contextlib.contextmanager
def bound(*, experiment: str | None = None, queue: str | None = None) -> Iterator[None]:
    """Tag every log line of this thread with the experiment and/or queue while the block runs."""
    tokens = []
    if experiment is not None:
        tokens.append((_experiment, _experiment.set(experiment)))
    if queue is not None:
        tokens.append((_queue, _queue.set(queue)))
    try:
        yield
    finally:
        for variable, token in reversed(tokens):
            variable.reset(token)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "experiment": _experiment.get(),
            "queue": _queue.get(),
            "thread": record.threadName,
        }
        if record.exc_info:
            event["error"] = self.formatException(record.exc_info)
        return json.dumps({k: v for k, v in event.items() if v is not None}, default=str)


class TextFormatter(logging.Formatter):
    """For people at a terminal: the same fields, in a line that reads left to right."""

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(
            f"{name}={value}"
            for name, value in (("queue", _queue.get()), ("experiment", _experiment.get()))
            if value
        )
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} {record.getMessage()}"
        if context:
            line += f"  [{context}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(*, fmt: str = "json", debug: bool = False) -> None:
    """Send runner logs to stderr (stdout carries the experiment's own output in ``run`` mode)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "pika"):
        logging.getLogger(noisy).setLevel(logging.INFO if debug else logging.WARNING)
