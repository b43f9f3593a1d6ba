"""What the HTTP (server/http_app.py) and gRPC (server/grpc_app.py) front ends share: the API-key
check, the model a request is routed to, the preview interval of streams, the seed of each image, the request parameter names and the
timings as they go on the wire. Each front end keeps only its own translation of messages."""

from __future__ import annotations

import hmac
from dataclasses import asdict, fields

from vqdiff.model.sampling.params import GenerationParams
from vqdiff.server.errors import from_submit, invalid, unauthenticated
from vqdiff.server.request import Timings
from vqdiff.server.scheduler import Unavailable
from vqdiff.server.served import Served
from vqdiff.server.settings import Settings

# the per-request generation parameters, in GenerationParams' order; both wire formats use these names
PARAM_NAMES: tuple[str, ...] = tuple(f.name for f in fields(GenerationParams))


def authorized(header: str | None, api_keys) -> bool:
    """Whether an ``Authorization`` header value (``"Bearer <key>"``, the scheme in any case) carries
    one of ``api_keys``; with no keys configured every request is allowed. Compared in constant time."""
    if not api_keys:
        return True
    header = header or ""
    token = header[7:] if header.lower().startswith("bearer ") else ""
    return any(hmac.compare_digest(token.encode(), k.encode()) for k in api_keys)


def resolve_model(engine, name: str | None) -> Served:
    """The model of ``engine.catalog`` a request names (None: the default), or the ``ApiError``:
    422 / INVALID_ARGUMENT naming ``model``, or 503 / UNAVAILABLE (counted) while nothing is served yet."""
    try:
        return engine.catalog.resolve(name)
    except ValueError as e:
        raise invalid(str(e), "model") from None
    except Unavailable as e:
        engine.metrics.count("unavailable")
        raise from_submit(e) from None


def require_key(header: str | None, api_keys) -> None:
    """``authorized``, raising the 401 / UNAUTHENTICATED ``ApiError`` when it is not."""
    if not authorized(header, api_keys):
        raise unauthenticated()


def preview_interval(requested: int | None, settings: Settings, steps: int) -> int:
    """Steps between a stream's previews: what the request asked for, else the server's
    ``preview_every``, else an eighth of the steps (at least 1)."""
    if requested is not None:
        return requested
    return settings.preview_every or max(1, steps // 8)


def timings_dict(t: Timings) -> dict[str, float]:
    """{queue_ms, denoise_ms, decode_ms, total_ms}: the keyword arguments of both wire types."""
    return asdict(t)
