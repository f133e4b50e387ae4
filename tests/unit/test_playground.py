"""The playground's files and routes, without an engine (the browser tests are in tests/e2e)."""

import re

from fastapi.testclient import TestClient

from server.app import create_app
from server.cli import serve_parser
from server.playground import FILES

SVG_NAMESPACE = "http://www.w3.org/2000/svg"


def test_page_and_assets_are_served_at_the_root():
    client = TestClient(create_app(engine=None))  # no lifespan: the engine is never started
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for path in re.findall(r'(?:src|href)="(/[^"]+)"', page.text):
        assert client.get(path).status_code == 200, path
    assert client.get("/playground/app.js").headers["content-type"].startswith(
        ("text/javascript", "application/javascript"))


def test_no_ui_leaves_the_page_out():
    assert serve_parser().parse_args(["--no-ui"]).no_ui
    assert not serve_parser().parse_args([]).no_ui
    client = TestClient(create_app(engine=None, playground=False))
    assert client.get("/").status_code == 404
    assert client.get("/playground/app.js").status_code == 404


def test_the_page_loads_nothing_from_the_network():
    """Every file ships in the package: no URL but the SVG namespace and this server's paths."""
    for file in FILES.iterdir():
        text = file.read_text()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`)]*", text))
        assert urls <= {SVG_NAMESPACE}, (file.name, urls)
