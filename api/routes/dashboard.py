"""The web dashboard: ``GET /`` redirects to ``/dashboard/``, which serves four static files.

Three (``api/dashboard/index.html``, ``app.js``, ``style.css``) are hand-written and need no build
step; they are found beside this package through ``Path(__file__)``. The fourth, ``plotly.min.js``
(the charts), is the file the pinned ``plotly`` package ships, served from where it is installed. They hold no data and
need no key: the page asks for an API key once, keeps it in the tab's ``sessionStorage``, and
sends it as ``Authorization: Bearer`` on every call to the ``/v1`` API, which does all the checking.

Only the named files are served (no directory walk). The pages are left out of the OpenAPI
description: they are not part of the API a client programs against.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Final

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from service.errors import NotFound

router = APIRouter(include_in_schema=False)

#: Where the dashboard's static files live.
DASHBOARD_DIR: Final = Path(__file__).resolve().parent.parent / "dashboard"

#: The files served under ``/dashboard/``, with their media types.
FILES: Final = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "plotly.min.js": "text/javascript; charset=utf-8",
}


def plotly_js() -> Path:
    """plotly.js, as the pinned ``plotly`` package ships it (the page's charts); never copied into the repository."""
    return Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))


#: The page loads only its own script, and talks only to its own origin. The job's report.html is shown in
#: a sandboxed frame (no script runs there) that inherits this policy: inline style is allowed for it (its
#: charts are SVG with style attributes), and framing by the service's own pages (the frame keeps the page's
#: origin, ``sandbox="allow-same-origin"`` without scripts, so that ``'self'`` admits it). No other site
#: may frame the page.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; frame-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'self'"
)


def _static(name: str) -> FileResponse:
    media_type = FILES.get(name)
    if media_type is None:
        raise NotFound(f"the dashboard has no file {name!r}")
    headers = {
        "Cache-Control": "no-cache",  # revalidate (ETag / Last-Modified), so an upgrade is seen at once
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if name == "index.html":
        headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    path = plotly_js() if name == "plotly.min.js" else DASHBOARD_DIR / name
    return FileResponse(path, media_type=media_type, headers=headers)


@router.api_route("/", methods=["GET", "HEAD"])
def root() -> RedirectResponse:
    """The service's front page is the dashboard."""
    return RedirectResponse("dashboard/", status_code=307)  # relative: right behind a path prefix too


@router.api_route("/dashboard", methods=["GET", "HEAD"])
def dashboard_redirect() -> RedirectResponse:
    """``/dashboard`` → ``/dashboard/``, so the page's relative links resolve under it."""
    return RedirectResponse("dashboard/", status_code=307)


@router.api_route("/dashboard/", methods=["GET", "HEAD"])
def dashboard_index() -> FileResponse:
    """The dashboard's single page."""
    return _static("index.html")


@router.api_route("/dashboard/{name}", methods=["GET", "HEAD"])
def dashboard_file(name: str) -> FileResponse:
    """The page's script and style sheet (404 for any other name)."""
    return _static(name)
