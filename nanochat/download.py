"""Fetching one file over http(s):// or file://, for the pretraining shards (nanochat/dataset.py) and the CORE eval
bundle (nanochat/eval_bundle.py).

Each attempt streams the body into a temporary file beside the destination, checks that it got as many bytes as the
Content-Length promised, runs the caller's validation, and only then renames the file into place: the destination
is the whole, checked file or it is untouched, never a partial file. Failed attempts are retried with exponential
backoff, except for errors that a retry cannot fix (see `is_permanent`).
"""

from __future__ import annotations

import http.client
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

CHUNK_BYTES = 1 << 20
SCHEMES = ("http", "https", "file")  # file:// lets a local mirror go through the same checks as a download


class DownloadError(RuntimeError):
    """No valid file arrived. `status` is the HTTP status of a permanent client error (which was not retried)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def is_permanent(error: Exception) -> bool:
    """A client error (4xx) gets the same answer however often it is asked, except 408 Request Timeout and
    429 Too Many Requests, which mean "try again later". Server errors (5xx), dropped connections, timeouts and
    short reads are transient.

    A file that fails validation is retried, not permanent: with a matching length it is in practice a body a proxy
    cut short under its own Content-Length, or an error page a CDN served with 200, and a later attempt can fix
    both; a file that is wrong at the source costs only `retries` extra fetches before the error says so."""
    return isinstance(error, urllib.error.HTTPError) and 400 <= error.code < 500 and error.code not in (408, 429)


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _content_length(response) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value is not None and value.strip().isdigit() else None


def _stream(url: str, out, timeout: float, progress: bool) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        expected = _content_length(response)
        received, next_report, started = 0, 0.1, time.monotonic()
        while chunk := response.read(CHUNK_BYTES):
            out.write(chunk)
            received += len(chunk)
            if progress and expected and received / expected >= next_report:
                rate = received / max(time.monotonic() - started, 1e-6)
                print(f"  {received / 2**20:.1f}/{expected / 2**20:.1f} MiB, ETA {(expected - received) / rate:.0f}s",
                      flush=True)
                next_report += 0.1
    # http.client returns b"" (no IncompleteRead) when the server closes early, so the length is checked here
    if expected is not None and received != expected:
        raise ConnectionError(f"connection closed after {received} of {expected} bytes")


def _attempt(url: str, destination: Path, timeout: float, validate: Callable[[Path], None] | None,
             progress: bool) -> None:
    # Not common.atomic_write_bytes: that holds the whole body in memory and renames before anyone could validate.
    fd, tmp_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            _stream(url, f, timeout, progress)
            f.flush()
            os.fsync(f.fileno())
        if validate is not None:
            validate(tmp)
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(destination.parent, os.O_RDONLY)  # so the rename itself survives a power cut
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def download_file(url: str, destination: Path, *, retries: int = 5, backoff_seconds: float = 2.0,
                  timeout: float = 60.0, validate: Callable[[Path], None] | None = None,
                  progress: bool = False) -> Path:
    """Fetch `url` into `destination` (replacing it) in up to 1 + `retries` attempts, waiting backoff_seconds,
    2*backoff_seconds, 4*backoff_seconds, ... between them. `validate(path)` sees each finished file before it is
    renamed into place and raises ValueError to reject it. With `progress`, prints every 10% and each retry.
    Raises DownloadError, naming the URL, at once on a permanent error and after the last failed attempt."""
    if urllib.parse.urlsplit(url).scheme not in SCHEMES:
        raise DownloadError(f"{url!r} is not a URL this downloader can fetch: give an {'/'.join(SCHEMES)} URL")
    if retries < 0:
        raise ValueError(f"retries must be at least 0, got {retries}")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            wait = backoff_seconds * 2 ** (attempt - 1)
            if progress:
                print(f"download failed ({errors[-1]}); retrying in {wait:.1f}s (attempt {attempt + 1} of "
                      f"{retries + 1})", flush=True)
            time.sleep(wait)
        try:
            _attempt(url, destination, timeout, validate, progress)
            return destination
        # URLError, HTTPError, timeouts and dropped connections are OSErrors; ValueError is a rejected file
        except (OSError, http.client.HTTPException, ValueError) as e:
            if is_permanent(e):
                raise DownloadError(f"{url}: {_describe(e)}, a client error that retrying will not fix: check the "
                                    "URL and that the file exists there", status=e.code) from e
            errors.append(_describe(e))
            last_error = e
    raise DownloadError(f"{url}: failed after {retries + 1} attempts ({'; '.join(errors[-3:])}): check the network "
                        "and the URL, then run again") from last_error
