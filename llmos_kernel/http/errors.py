"""Errors the OpenAI way: the HTTP status and body the ``openai`` SDKs map to exceptions.

Every llmos error type has one status here; the body is
``{"error": {"message", "type", "param", "code"}}``. The message is llmos's own, which
says what to fix.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from llmos_kernel.errors import (
    Cancelled,
    ContextOverflow,
    InvalidArgument,
    LlmosError,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
    Timeout,
    Unavailable,
)

# (llmos error class, HTTP status, OpenAI error type, code); the first match wins
_MAP: list[tuple[type[LlmosError], int, str, str | None]] = [
    (ContextOverflow, 400, "invalid_request_error", "context_length_exceeded"),
    (InvalidArgument, 400, "invalid_request_error", None),
    (NotFound, 404, "invalid_request_error", "not_found"),
    (PermissionDenied, 403, "permission_error", None),
    (QuotaExceeded, 429, "rate_limit_error", "quota_exceeded"),
    (Timeout, 408, "timeout_error", None),
    (Cancelled, 499, "cancelled", None),
    (Unavailable, 503, "service_unavailable", None),
]


class ApiError(Exception):
    """An HTTP-level refusal with its own status and code (a bad key, an oversize body)."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param


def body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def response(status: int, message: str, type_: str, code: str | None = None,
             param: str | None = None) -> JSONResponse:
    return JSONResponse(body(message, type_, code, param), status_code=status)


def of(error: LlmosError) -> tuple[int, dict]:
    for cls, status, type_, code in _MAP:
        if isinstance(error, cls):
            return status, body(str(error), type_, code)
    return 500, body(str(error), "server_error")


def install(app) -> None:
    """Answer every failure of ``app`` with an OpenAI-style body."""

    @app.exception_handler(LlmosError)
    async def llmos_error(request: Request, error: LlmosError) -> JSONResponse:
        status, content = of(error)
        return JSONResponse(content, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return response(error.status, str(error), error.type, error.code, error.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return response(400, f"the body is not valid JSON: {first.get('msg')}",
                            "invalid_request_error", "invalid_json")
        return response(400, f"{where or 'body'}: {first.get('msg', 'invalid')}",
                        "invalid_request_error", "invalid_parameter", where)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return response(error.status_code, str(error.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception) -> JSONResponse:
        return response(500, f"internal error: {type(error).__name__}: {error}", "server_error")
