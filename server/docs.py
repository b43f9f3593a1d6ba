"""``/docs``: Swagger UI with its JavaScript, CSS and favicon served by this server, so the page
renders on a machine that reaches nothing but the server (FastAPI's own page loads them from a CDN).

The files are the ``static`` folder of the ``fastapi-offline`` package (Swagger UI 5, which renders
the OpenAPI 3.1 that FastAPI emits); only that folder is used, not the package's FastAPI factory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
STATIC_URL = "/docs/static"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")


def static_dir() -> Path:
    """The folder with ``ASSETS``; raises if the installed fastapi-offline no longer has them there."""
    folder = Path(str(resources.files("fastapi_offline") / "static"))
    missing = [name for name in ASSETS if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"/docs: {folder} lacks {missing}; install the fastapi-offline version that "
                           f"pyproject.toml names")
    return folder


def add_docs(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` (and its OAuth2 redirect page) from local assets under
    ``/docs/static``. ``app`` must be made with ``docs_url=None`` (else FastAPI's CDN page would answer
    ``/docs`` first) and keep an ``openapi_url``."""
    if app.docs_url is not None:
        raise ValueError(f"add_docs: create the app with FastAPI(docs_url=None); it serves its own page at "
                         f"{app.docs_url!r}")
    if app.openapi_url is None:
        raise ValueError("add_docs: the app has openapi_url=None, so Swagger UI would have no schema to show")
    app.mount(STATIC_URL, StaticFiles(directory=static_dir()), name="docs-static")
    redirect_url = app.swagger_ui_oauth2_redirect_url

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy that strips a prefix
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url, title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + redirect_url if redirect_url else None,
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters)

    if redirect_url:
        @app.get(redirect_url, include_in_schema=False)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()
