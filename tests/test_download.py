"""The one downloader (nanochat/download.py), against a local HTTP server that misbehaves on purpose: what is
retried, what is not, and that the destination is only ever the whole, valid file."""

from __future__ import annotations

from pathlib import Path

import pytest

from nanochat.download import DownloadError, download_file

BODY = b"the file we want, " * 100


def fetch(http_server, destination: Path, **kwargs) -> Path:
    return download_file(http_server["url"], destination, retries=kwargs.pop("retries", 3), backoff_seconds=0.001,
                         timeout=10, **kwargs)


def test_server_errors_are_retried_until_the_file_arrives(http_server, tmp_path):
    http_server["responses"] = [(500, b"busy"), (503, b"still busy"), (200, BODY)]
    assert fetch(http_server, tmp_path / "file.bin").read_bytes() == BODY
    assert len(http_server["requests"]) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # no temporary files left


@pytest.mark.parametrize("status", [408, 429])
def test_request_timeout_and_rate_limit_are_retried_not_permanent(http_server, tmp_path, status):
    http_server["responses"] = [(status, b"later"), (200, BODY)]
    assert fetch(http_server, tmp_path / "file.bin").read_bytes() == BODY
    assert len(http_server["requests"]) == 2


def test_a_missing_file_fails_at_once_naming_the_url(http_server, tmp_path):
    http_server["responses"] = [(404, b"no such file")]
    with pytest.raises(DownloadError, match="HTTP Error 404.*will not fix: check the URL") as excinfo:
        fetch(http_server, tmp_path / "file.bin", retries=5)
    assert http_server["url"] in str(excinfo.value) and excinfo.value.status == 404
    assert len(http_server["requests"]) == 1
    assert list(tmp_path.iterdir()) == []


def test_a_short_read_is_a_failed_attempt_that_is_retried(http_server, tmp_path):
    http_server["responses"] = [(200, BODY[:10], len(BODY)), (200, BODY)]
    assert fetch(http_server, tmp_path / "file.bin").read_bytes() == BODY
    assert len(http_server["requests"]) == 2


def test_a_body_that_stays_short_leaves_no_file_under_the_final_name(http_server, tmp_path):
    http_server["responses"] = [(200, BODY[:10], len(BODY))]
    with pytest.raises(DownloadError, match=f"failed after 3 attempts.*closed after 10 of {len(BODY)} bytes"):
        fetch(http_server, tmp_path / "file.bin", retries=2)
    assert len(http_server["requests"]) == 3
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_fails_validation_is_retried_and_leaves_no_file(http_server, tmp_path):
    http_server["responses"] = [(200, b"<html>an error page served with 200</html>")]
    seen: list[bytes] = []

    def validate(path: Path) -> None:
        seen.append(path.read_bytes())
        raise ValueError("not the file we want")

    with pytest.raises(DownloadError, match="failed after 3 attempts.*not the file we want.*check the network"):
        fetch(http_server, tmp_path / "file.bin", retries=2, validate=validate)
    assert len(seen) == len(http_server["requests"]) == 3  # validation saw each whole body
    assert list(tmp_path.iterdir()) == []


def test_a_failed_download_leaves_the_previous_file_untouched(http_server, tmp_path):
    destination = tmp_path / "file.bin"
    destination.write_bytes(b"the previous version")
    http_server["responses"] = [(500, b"busy")]
    with pytest.raises(DownloadError):
        fetch(http_server, destination, retries=1)
    assert destination.read_bytes() == b"the previous version"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
