"""``/docs`` (server/docs.py): Swagger UI from local assets. In-process checks of the routes, and
headless Chromium against the real server with every non-loopback request refused: the page must
still render the API (skipped without Chromium, except under CI, where a missing browser fails)."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

import vqdiff.server.docs as docs
from vqdiff.model.io.folder import random_model
from vqdiff.server.docs import ASSETS, add_docs
from tests.serving import ServerThread
from tests.serving import chromium as chromium_path

TIMEOUT_MS = 15_000
LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}


def bare_app() -> FastAPI:
    app = FastAPI(title="docs-check", docs_url=None, redoc_url=None)

    @app.get("/ping")
    def ping() -> dict:
        return {"ok": True}

    add_docs(app)
    return app


def test_docs_page_points_only_at_local_assets():
    with TestClient(bare_app()) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert sorted(re.findall(r'(?:src|href)="([^"]*)"', page.text)) == [
            "/docs/static/favicon.png", "/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui.css"]
        assert "http" not in page.text.lower(), "the page names an absolute URL"
        assert "url: '/openapi.json'" in page.text and "<title>docs-check - Swagger UI</title>" in page.text
        folder = docs.static_dir()
        for name in ASSETS:
            asset = client.get(f"/docs/static/{name}")
            assert asset.status_code == 200 and asset.content == (folder / name).read_bytes(), name
        assert "javascript" in client.get("/docs/static/swagger-ui-bundle.js").headers["content-type"]
        redirect = client.get("/docs/oauth2-redirect")
        assert redirect.status_code == 200 and "oauth2" in redirect.text
        assert client.get("/docs/static/nope.js").status_code == 404
        assert "/docs" not in client.get("/openapi.json").json()["paths"]  # not an API operation


def test_docs_page_honours_root_path():
    with TestClient(bare_app(), root_path="/api") as client:
        page = client.get("/docs")
    assert 'src="/api/docs/static/swagger-ui-bundle.js"' in page.text and "url: '/api/openapi.json'" in page.text


def test_add_docs_refuses_an_app_with_its_own_docs_page():
    with pytest.raises(ValueError, match=r"docs_url=None"):
        add_docs(FastAPI())
    with pytest.raises(ValueError, match=r"openapi_url=None"):
        add_docs(FastAPI(docs_url=None, openapi_url=None))


def test_missing_assets_are_named(monkeypatch, tmp_path):
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "swagger-ui.css").write_text("")
    monkeypatch.setattr(docs.resources, "files", lambda package: tmp_path)
    with pytest.raises(RuntimeError, match=r"lacks \['swagger-ui-bundle.js', 'favicon.png'\]"):
        docs.static_dir()


# -- in a browser, offline -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    path = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # every host name but loopback fails to resolve: the machine is offline as far as the page knows
        browser = p.chromium.launch(executable_path=path, headless=True, args=[
            "--no-sandbox", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tokenizer, tiny_config):
    model = random_model(tiny_config, tokenizer, seed=3).eval()
    with torch.no_grad():
        model.transformer.out.weight.mul_(40.0)
    with ServerThread(model) as s:
        yield s


def test_docs_render_offline_in_chromium(chromium, server, tmp_path: Path):
    from playwright.sync_api import expect

    context = chromium.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    requested, refused, errors = [], [], []
    page.on("request", lambda r: requested.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))

    def only_loopback(route):
        if urlsplit(route.request.url).hostname in LOOPBACK:
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort("internetdisconnected")

    context.route("**/*", only_loopback)
    try:
        page.goto(server.url + "/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("vqdiff", timeout=TIMEOUT_MS)
        operation = page.locator(".opblock-get", has=page.locator('[data-path="/v1/models"]'))
        expect(page.locator('.opblock-post [data-path="/v1/generate"]')).to_be_visible(timeout=TIMEOUT_MS)
        # the page works, not only draws: run GET /v1/models from it
        operation.locator(".opblock-summary").click()
        operation.get_by_role("button", name="Try it out").click()
        operation.get_by_role("button", name="Execute").click()
        status = operation.locator(".live-responses-table .response-col_status:not(.col_header)")
        expect(status).to_contain_text("200", timeout=TIMEOUT_MS)
        page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
    finally:
        context.close()
    assert not refused, f"the page asked for non-loopback URLs: {refused}"
    hosts = {urlsplit(url).hostname for url in requested if not url.startswith(("data:", "blob:"))}
    assert hosts <= LOOPBACK, hosts
    assert any(url.endswith("/docs/static/swagger-ui-bundle.js") for url in requested), requested
    assert not errors, errors
