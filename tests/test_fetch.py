"""fetch: a URL input downloads atomically; a short body, or one that trickles in past the deadline
or under the minimum rate, is refused and nothing is kept."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from pipeline.data.fetch import TooSlow, fetch


class Handler(http.server.BaseHTTPRequestHandler):
    body = b"WARC/1.0\r\n" * 1000

    def do_GET(self):
        self.send_response(200)
        if self.path.endswith("trickle"):  # a byte every 0.1 s, for 60 s
            self.send_header("Content-Length", "600")
            self.end_headers()
            try:
                for _ in range(600):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:  # the client gave up
                pass
            return
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


@pytest.mark.parametrize("config, key", [
    ({"deadline_s": 1, "min_bytes_per_s": 0}, "fetch.deadline_s"),
    ({"rate_window_s": 0.5, "min_bytes_per_s": 100}, "fetch.min_bytes_per_s"),
])
def test_a_trickling_server_is_cut_off_by_the_deadline_or_the_rate(tmp_path, server, config, key):
    out = tmp_path / "x.warc.wet.gz"
    with pytest.raises(TooSlow, match=key):
        fetch(f"{server}/trickle", str(out), {"timeout_s": 5, **config})  # each read is within its timeout
    assert list(tmp_path.iterdir()) == []
