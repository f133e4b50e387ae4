"""The playground: one page, served at `/` from files in this folder (no CDN, no build step),
that talks to this server's own API: tokens coloured by entropy, every steering method one
click away. `steer serve --no-ui` leaves it out."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

FILES = Path(__file__).parent / "static"


def install_playground(app: FastAPI) -> None:
    """`GET /` serves the page, `/playground/*` its script and style."""

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(FILES / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/playground", StaticFiles(directory=FILES), name="playground")
