"""The image's HEALTHCHECK asks /readyz of its own role on the port its settings name."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vqdiff.server import healthcheck
from vqdiff.server.settings import Settings


def test_the_probe_follows_the_role_and_the_configured_port():
    assert healthcheck.readyz_url(Settings(http_port=9123)) == "http://127.0.0.1:9123/readyz"
    assert healthcheck.readyz_url(Settings(role="api", http_port=9124)) == "http://127.0.0.1:9124/readyz"
    assert healthcheck.readyz_url(Settings(role="worker", http_port=9124, worker_port=9125)) == \
        "http://127.0.0.1:9125/readyz"
    assert healthcheck.readyz_url(Settings(role="worker", worker_port=0)) is None


@pytest.fixture
def readyz():
    """A loopback /readyz whose status the test sets."""
    state = {"status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(state["status"] if self.path == "/readyz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], state
    server.shutdown()
    server.server_close()


def test_exit_status_is_0_only_when_ready(readyz, monkeypatch):
    port, state = readyz
    monkeypatch.setenv("VQDIFF_ROLE", "worker")
    monkeypatch.setenv("VQDIFF_WORKER_PORT", str(port))
    assert healthcheck.main() == 0
    state["status"] = 503
    assert healthcheck.main() == 1
    monkeypatch.setenv("VQDIFF_WORKER_PORT", str(port + 1 if port < 65535 else port - 1))  # nothing listens
    assert healthcheck.main() == 1
    monkeypatch.setenv("VQDIFF_WORKER_PORT", "not-a-port")
    assert healthcheck.main() == 1
