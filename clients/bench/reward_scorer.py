"""A process-reward service speaking the server's HTTP reward contract (`--reward-url`), on
loopback: POST {"prompt", "trajectories"} → {"scores": [...]}, one score in [0, 1] per
trajectory. Subclasses define the scores."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from clients.bench.local_server import free_port


class ScorerHandler(BaseHTTPRequestHandler):
    def scores(self, trajectories: list[str]) -> list[float] | None:
        """The scores to answer, or None for a 500."""
        raise NotImplementedError

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        scores = self.scores(body["trajectories"])
        if scores is None:
            self.send_response(500)
            self.end_headers()
            return
        data = json.dumps({"scores": scores}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextmanager
def scorer_url(handler: type[ScorerHandler]) -> Iterator[str]:
    """The service answering with `handler`, for as long as the block runs; yields its URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/score"
    finally:
        httpd.shutdown()
