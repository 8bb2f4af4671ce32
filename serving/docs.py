"""``/docs`` without the internet: Swagger UI served from the ``swagger-ui-bundle`` package.

FastAPI's default ``/docs`` page loads its script and styles from a CDN and ``/redoc`` loads
ReDoc from another; on a cluster without internet access both pages stay blank. Here the
assets come from the installed package under ``/docs/static/``, ``/redoc`` is off, and the
OpenAPI document declares the bearer scheme so "Authorize" / "Try it out" can send the key.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

STATIC = "/docs/static"


def add_docs(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` from local assets (the app needs ``docs_url=None``)."""
    app.mount(STATIC, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API docs",
            oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
            swagger_js_url=f"{root}{STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC}/swagger-ui.css",
            swagger_favicon_url="data:,",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()
