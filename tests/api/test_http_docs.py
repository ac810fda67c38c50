"""The API's documentation pages over real HTTP: served from the installed package's files, no CDN."""

from __future__ import annotations

import re

import httpx

from api.routes.docs import FILES, static_dir
from tests.api.conftest import LiveServer


def test_docs_pages_load_only_local_files(live: LiveServer) -> None:
    with httpx.Client(base_url=live.url, timeout=10) as c:  # no key: the docs are public, as the schema is
        for page, wanted in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
            r = c.get(page)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), page
            sources = re.findall(r'(?:src|href)="([^"]+)"', r.text)
            assert f"/docs/static/{wanted}" in sources and "/openapi.json" in r.text, sources
            assert all(s.startswith("/") for s in sources), sources  # nothing from another origin
            assert "cdn" not in r.text and "fonts.googleapis" not in r.text
            csp = r.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "img-src 'self' data: blob:" in csp
        for name, media_type in FILES.items():
            r = c.get(f"/docs/static/{name}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(media_type.split(";")[0]), name
            assert r.content == (static_dir() / name).read_bytes() and len(r.content) > 1000
        for path in ("/docs/static/../core.py", "/docs/static/core.py", "/docs/static/%2e%2e%2f__init__.py"):
            r = c.get(path)
            assert r.status_code == 404 and r.json()["error"] == "not_found", path
        spec = c.get("/openapi.json").json()
        assert "/docs" not in spec["paths"] and "/redoc" not in spec["paths"]
        assert [t["name"] for t in spec["tags"]] == ["models", "datasets", "jobs", "artifacts", "health"]
