"""One small HTTP server for Kubernetes and Prometheus: ``/metrics``, ``/healthz``, ``/readyz``.

The upstream runner served only ``/metrics``. ``/healthz`` (liveness) fails once the service
loop has ended or stopped turning, so the kubelet restarts a wedged runner; unacked messages
go back to their queues when it dies. ``/readyz`` (readiness) says whether the runner takes
work now: state Running and a queue server answered recently. It fails while draining or when
no broker answers, which is what a rollout or an autoscaler wants to know; it never restarts
anything.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from http.server import ThreadingHTTPServer

from prometheus_client.exposition import MetricsHandler
from prometheus_client.registry import CollectorRegistry

from .service import RunnerState, Service

log = logging.getLogger(__name__)

WEDGED_AFTER_SECONDS = 300.0
"""A service loop that has not turned for this long is wedged. Generous: a queue listing can
block on a slow broker, and a false liveness failure kills running experiments."""
ANSWER_WINDOW_SECONDS = 60.0
"""Ready only if some queue server answered within this long (at least four queue refreshes)."""


def parse_address(address: str) -> tuple[str, int]:
    """``:9090``, ``0.0.0.0:9090``, ``127.0.0.1:9123`` or ``[::]:9090`` as (host, port); host '' means all."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--prom-address {address!r} is not HOST:PORT or :PORT (e.g. ':9090')")
    return host.strip("[]"), int(port)


class HealthServer:
    """Serves the runner's registry and health on its own daemon threads; ``close`` stops it."""

    def __init__(
        self,
        address: str,
        registry: CollectorRegistry,
        service: Service,
        *,
        wedged_after: float = WEDGED_AFTER_SECONDS,
        answer_window: float | None = None,
    ) -> None:
        host, port = parse_address(address)
        self.service = service
        self.wedged_after = wedged_after
        self.answer_window = answer_window or max(ANSWER_WINDOW_SECONDS, 4 * service.refresh_interval)
        handler = _handler(registry, self)
        server_class = _Server6 if ":" in host else _Server
        self._server = server_class((host, port), handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="health http", kwargs={"poll_interval": 0.5}, daemon=True
        )

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("metrics and health on port %d: /metrics /healthz /readyz", self.port)
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def healthy(self) -> tuple[bool, str]:
        service = self.service
        if service.ended:
            return False, "the service loop has ended"
        age = service.loop_age()
        if age > self.wedged_after:
            return False, f"the service loop has not turned for {age:.0f} s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        service = self.service
        if not service.taking_work:
            running = service.state is RunnerState.RUNNING
            return False, f"not taking work ({'draining or stopping' if running else service.state.value})"
        answered = service.last_answer
        if answered is None:
            return False, "no queue server has answered yet"
        silence = time.monotonic() - answered
        if silence > self.answer_window:
            return False, f"no queue server has answered for {silence:.0f} s"
        return True, "ok"


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def _handler(registry: CollectorRegistry, health: HealthServer) -> type[MetricsHandler]:
    class Handler(MetricsHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                super().do_GET()
            elif path in ("/healthz", "/livez"):
                self._answer(*health.healthy())
            elif path == "/readyz":
                self._answer(*health.ready())
            else:
                self._answer(False, "not found: try /metrics, /healthz or /readyz", code=404)

        def _answer(self, ok: bool, text: str, code: int | None = None) -> None:
            body = (text + "\n").encode()
            self.send_response(code or (200 if ok else 503))
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    Handler.registry = registry
    return Handler
