"""``python -m vqdiff.server.healthcheck``: the container image's HEALTHCHECK. Asks ``/readyz`` of
this container's role on the port its settings name (``VQDIFF_ROLE``, ``VQDIFF_HTTP_PORT`` or, for a
worker, ``VQDIFF_WORKER_PORT``), so a container whose port was changed is not reported unhealthy.
Exit status 0: ready; 1: not ready, not answering, or settings that do not parse."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

from vqdiff.server.settings import BadSetting, Settings


def readyz_url(settings: Settings) -> str | None:
    """The URL to probe; None for a worker that serves no health port (``--worker-port 0``)."""
    port = settings.worker_port if settings.role == "worker" else settings.http_port
    return f"http://127.0.0.1:{port}/readyz" if port else None


def main() -> int:
    try:
        url = readyz_url(Settings.from_env())
    except (BadSetting, ValueError) as e:
        print(f"healthcheck: {e}", file=sys.stderr)
        return 1
    if url is None:
        return 0  # nothing to ask: the process being alive is all docker can know
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return 0 if r.status == 200 else 1
    except (urllib.error.URLError, OSError) as e:
        print(f"healthcheck: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
