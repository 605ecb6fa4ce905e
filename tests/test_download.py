"""The one downloader (nanochat/download.py), against a local HTTP server that misbehaves on purpose: what is
retried, what is not, and that the destination is only ever the whole, valid file."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from nanochat.download import DownloadError, download_file

BODY = b"the file we want, " * 100


@pytest.fixture
def server():
    """Answers request i with replies[i] (the last one repeats): (status, body), or (status, body, content_length)
    to promise more bytes than it sends. Counts the requests. Like test_core_eval's http_server, plus short reads."""
    state = {"replies": [], "requests": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            state["requests"] += 1
            status, body, *declared = state["replies"][min(state["requests"], len(state["replies"])) - 1]
            self.send_response(status)
            self.send_header("Content-Length", str(declared[0] if declared else len(body)))
            self.end_headers()
            self.wfile.write(body)  # HTTP/1.0: the connection closes after this, cutting a short body short

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/file.bin"
    yield state
    httpd.shutdown()
    httpd.server_close()


def fetch(server, destination: Path, **kwargs) -> Path:
    return download_file(server["url"], destination, retries=kwargs.pop("retries", 3), backoff_seconds=0.001,
                         timeout=10, **kwargs)


def test_server_errors_are_retried_until_the_file_arrives(server, tmp_path):
    server["replies"] = [(500, b"busy"), (503, b"still busy"), (200, BODY)]
    assert fetch(server, tmp_path / "file.bin").read_bytes() == BODY
    assert server["requests"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary files left


@pytest.mark.parametrize("status", [408, 429])
def test_request_timeout_and_rate_limit_are_retried_not_permanent(server, tmp_path, status):
    server["replies"] = [(status, b"later"), (200, BODY)]
    assert fetch(server, tmp_path / "file.bin").read_bytes() == BODY
    assert server["requests"] == 2


def test_a_missing_file_fails_at_once_naming_the_url(server, tmp_path):
    server["replies"] = [(404, b"no such file")]
    with pytest.raises(DownloadError, match="HTTP Error 404.*will not fix: check the URL") as excinfo:
        fetch(server, tmp_path / "file.bin", retries=5)
    assert server["url"] in str(excinfo.value) and excinfo.value.status == 404
    assert server["requests"] == 1
    assert list(tmp_path.iterdir()) == []


def test_a_short_read_is_a_failed_attempt_that_is_retried(server, tmp_path):
    server["replies"] = [(200, BODY[:10], len(BODY)), (200, BODY)]
    assert fetch(server, tmp_path / "file.bin").read_bytes() == BODY
    assert server["requests"] == 2


def test_a_body_that_stays_short_leaves_no_file_under_the_final_name(server, tmp_path):
    server["replies"] = [(200, BODY[:10], len(BODY))]
    with pytest.raises(DownloadError, match=f"failed after 3 attempts.*closed after 10 of {len(BODY)} bytes"):
        fetch(server, tmp_path / "file.bin", retries=2)
    assert server["requests"] == 3
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_fails_validation_is_retried_and_leaves_no_file(server, tmp_path):
    server["replies"] = [(200, b"<html>an error page served with 200</html>")]
    seen: list[bytes] = []

    def validate(path: Path) -> None:
        seen.append(path.read_bytes())
        raise ValueError("not the file we want")

    with pytest.raises(DownloadError, match="failed after 3 attempts.*not the file we want.*check the network"):
        fetch(server, tmp_path / "file.bin", retries=2, validate=validate)
    assert len(seen) == server["requests"] == 3  # validation saw each whole body
    assert list(tmp_path.iterdir()) == []


def test_a_failed_download_leaves_the_previous_file_untouched(server, tmp_path):
    destination = tmp_path / "file.bin"
    destination.write_bytes(b"the previous version")
    server["replies"] = [(500, b"busy")]
    with pytest.raises(DownloadError):
        fetch(server, destination, retries=1)
    assert destination.read_bytes() == b"the previous version"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
