"""The one ``/metrics`` + ``/healthz`` HTTP server, for workers and the scaler.

Built on prometheus-client's WSGI app (``make_wsgi_app``) behind a small router, on
a daemon thread. ``/healthz`` answers 200 with the reason (``ok`` by default) while
``healthy`` says so, else 503 with the reason; anything else is 404.
"""

from __future__ import annotations

import threading
from socketserver import ThreadingMixIn
from typing import Any, Callable, Union
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

__all__ = ["serve_http", "Health"]

# A bool, or (ok, reason): the reason is the /healthz body.
Health = Callable[[], Union[bool, tuple[bool, str]]]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:  # scrapes are not worth a log line each
        pass


def _app(registry: Any, healthy: Health):
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/metrics"):
            return metrics_app(environ, start_response)
        if path.startswith("/healthz"):
            result = healthy()
            ok, reason = result if isinstance(result, tuple) else (result, "ok" if result else "stalled")
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [f"{reason}\n".encode()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]

    return app


def serve_http(port: int, registry: Any, healthy: Health = lambda: True, *, host: str = "0.0.0.0",
               name: str = "metrics-http") -> WSGIServer:
    """Serve ``registry`` (anything with ``collect()``) and ``healthy`` on ``host:port``
    (0: a free port, see ``server_port``); stop it with ``shutdown()`` + ``server_close()``.
    OSError if the port cannot be bound."""
    httpd = make_server(host, port, _app(registry, healthy), server_class=_Server, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name=name, daemon=True).start()
    return httpd
