"""The API's documentation pages, ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), served with no network.

FastAPI's own pages load their scripts from a CDN, so they are blank on a machine without internet.
Here the same pages load Swagger UI's and ReDoc's files from the pinned ``fastapi-offline``
package (its ``static`` folder), served under ``/docs/static/``. Only the named files are served;
the pages are left out of the OpenAPI description.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Final

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from service.errors import NotFound

router = APIRouter(include_in_schema=False)

#: The files the pages load, with their media types.
FILES: Final = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}


def static_dir() -> Path:
    """The folder of Swagger UI's and ReDoc's files, inside the installed ``fastapi_offline`` package."""
    return Path(str(resources.files("fastapi_offline") / "static"))


#: The pages load their files from this service and talk to it alone; nothing from another origin, not even
#: ReDoc's "powered by" logo. Inline script and style: FastAPI's page templates start the UIs inline.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def _page(response: HTMLResponse) -> HTMLResponse:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _base(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/docs")
def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI: every operation, tried out against this service."""
    base = _base(request)
    return _page(
        get_swagger_ui_html(
            openapi_url=f"{base}{request.app.openapi_url}",
            title=f"{request.app.title}: API",
            oauth2_redirect_url=f"{base}/docs/oauth2-redirect",
            swagger_js_url=f"{base}/docs/static/swagger-ui-bundle.js",
            swagger_css_url=f"{base}/docs/static/swagger-ui.css",
            swagger_favicon_url=f"{base}/docs/static/favicon.png",
        )
    )


@router.get("/docs/oauth2-redirect")
def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    """ReDoc: the same description as one readable page."""
    base = _base(request)
    return _page(
        get_redoc_html(
            openapi_url=f"{base}{request.app.openapi_url}",
            title=f"{request.app.title}: API reference",
            redoc_js_url=f"{base}/docs/static/redoc.standalone.js",
            redoc_favicon_url=f"{base}/docs/static/favicon.png",
            with_google_fonts=False,
        )
    )


@router.get("/docs/static/{name}")
def docs_file(name: str) -> FileResponse:
    """One of the pages' files (404 for any other name)."""
    media_type = FILES.get(name)
    if media_type is None:
        raise NotFound(f"the docs have no file {name!r}")
    headers = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}
    return FileResponse(static_dir() / name, media_type=media_type, headers=headers)
