"""One error type for the API side, and how engine outcomes map onto HTTP and gRPC status codes."""

from __future__ import annotations

import re

import grpc

from vqdiff.server.request import Status
from vqdiff.server.scheduler import Draining, QueueFull, Unavailable, UnknownRequest


class ApiError(Exception):
    """Rendered as ``{"error": {message, type, param, code}}`` with ``status`` (HTTP) / ``grpc_code``."""

    def __init__(self, status: int, message: str, type: str, param: str | None = None, code: str | None = None,
                 grpc_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.grpc_code, self.headers = grpc_code, headers or {}
        self.counted = False  # True once vqdiff_requests_total has it (the engine counts its own refusals)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_FIELD = re.compile(r"^([a-z_]+): ")


def invalid(message: str, param: str | None = None) -> ApiError:
    if param is None and (m := _FIELD.match(message)):
        param = m.group(1)
    return ApiError(422, message, "invalid_request_error", param, "invalid_value", grpc.StatusCode.INVALID_ARGUMENT)


def bad_body(why: str) -> ApiError:
    """A body that is not a JSON document at all."""
    return ApiError(422, f"the request body must be a JSON object sent with 'Content-Type: application/json' ({why})",
                    "invalid_request_error", None, "invalid_json", grpc.StatusCode.INVALID_ARGUMENT)


def from_submit(e: Exception, retry_after_s: int = 1) -> ApiError:
    """What ``Engine.submit`` raised, as an API error."""
    error = _from_submit(e, retry_after_s)
    error.counted = True
    return error


def _from_submit(e: Exception, retry_after_s: int) -> ApiError:
    if isinstance(e, QueueFull):
        return ApiError(429, f"the queue is full: {e}", "rate_limit_error", None, "queue_full",
                        grpc.StatusCode.RESOURCE_EXHAUSTED, {"Retry-After": str(retry_after_s)})
    if isinstance(e, Draining):
        return unavailable("the server is shutting down and takes no new requests")
    if isinstance(e, Unavailable):
        return unavailable(f"the server cannot take requests now: {e}")
    if isinstance(e, UnknownRequest):
        return ApiError(404, str(e), "not_found", None, "not_found", grpc.StatusCode.NOT_FOUND)
    if isinstance(e, ValueError):
        return invalid(str(e))
    raise e


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, "service_unavailable", None, "unavailable", grpc.StatusCode.UNAVAILABLE,
                    {"Retry-After": "5"})


def from_failure(status: Status, message: str) -> ApiError:
    """A request that the engine finished without an image."""
    if status == Status.FINISHED_DEADLINE:
        return ApiError(504, message, "timeout", None, "deadline_exceeded", grpc.StatusCode.DEADLINE_EXCEEDED)
    if status == Status.FINISHED_CANCELLED:
        return ApiError(499, message, "cancelled", None, "cancelled", grpc.StatusCode.CANCELLED)
    if status == Status.FINISHED_UNAVAILABLE:
        return unavailable(message)
    return ApiError(500, message, "server_error", None, "generation_failed", grpc.StatusCode.INTERNAL)


def unauthenticated() -> ApiError:
    return ApiError(401, "a valid API key is required: send 'Authorization: Bearer <key>'", "authentication_error",
                    None, "invalid_api_key", grpc.StatusCode.UNAUTHENTICATED, {"WWW-Authenticate": "Bearer"})
