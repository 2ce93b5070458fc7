"""The web pages for people, at ``/``: the jobs list with a submit form, and a page per job.

Plain HTML and one small script (``app/web/``), no build step: the pages read the JSON API with the
browser's fetch, sending the API key the person typed in (kept in the tab's session storage) where
the service requires keys. Not in the OpenAPI document: they are pages, not API.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.core.errors import NotFound

router = APIRouter(include_in_schema=False)

WEB = Path(__file__).resolve().parents[2] / "web"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
# The pages hold no data (the script fetches it), so they may be cached briefly; the data never is.
CACHE = {"Cache-Control": "no-cache"}


@router.get("/")
def jobs_page() -> FileResponse:
    return FileResponse(WEB / "index.html", media_type="text/html", headers=CACHE)


@router.get("/jobs/{job_id}")
def job_page(job_id: uuid.UUID) -> FileResponse:
    return FileResponse(WEB / "job.html", media_type="text/html", headers=CACHE)


@router.get("/ui/{name}")
def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise NotFound(f"no such file {name!r}", field="name")
    return FileResponse(WEB / name, media_type=ASSETS[name], headers=CACHE)
