"""fetch: a URL input downloads atomically; a short body is refused, not kept."""

from __future__ import annotations

import http.server
import threading

import pytest

from pipeline.data.fetch import fetch


class Handler(http.server.BaseHTTPRequestHandler):
    body = b"WARC/1.0\r\n" * 1000

    def do_GET(self):
        self.send_response(200)
        short = self.path.endswith("short")
        self.send_header("Content-Length", str(len(self.body) + (100 if short else 0)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_fetch_writes_the_whole_body(tmp_path, server):
    out = tmp_path / "x.warc.wet.gz"
    assert fetch(f"{server}/x.warc.wet.gz", str(out)) == len(Handler.body)
    assert out.read_bytes() == Handler.body


def test_short_body_is_an_error_and_leaves_nothing(tmp_path, server):
    out = tmp_path / "x.warc.wet.gz"
    with pytest.raises(Exception):
        fetch(f"{server}/short", str(out))
    assert list(tmp_path.iterdir()) == []
