"""Pretraining shards: reading row groups across ranks, and a downloader that survives a flaky server."""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.dataset import (
    CORPORA,
    MAX_SHARD,
    ShardDownloadError,
    default_shard_dir,
    download_shard,
    download_shards,
    iter_documents_batched,
    iter_row_groups,
    list_shards,
    main,
    shard_name,
    validate_shard,
)


def write_shard(path: Path, texts: list[str], row_group_size: int = 4) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)


def shard_texts(index: int) -> list[str]:
    return [f"shard {index} document {i}: " + "some words " * (i + 1) for i in range(10)]


# -----------------------------------------------------------------------------
# Reading


def test_ranks_read_disjoint_row_groups_that_cover_the_split(tmp_path):
    for i in range(3):
        write_shard(tmp_path / shard_name(i), shard_texts(i))  # 3 row groups each: 4 + 4 + 2 documents
    everything = [doc for batch in iter_documents_batched("train", data_dir=tmp_path) for doc in batch]
    assert everything == shard_texts(0) + shard_texts(1)  # the last shard is validation
    per_rank = [[doc for batch in iter_documents_batched("train", rank, 2, tmp_path) for doc in batch]
                for rank in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(everything)
    assert [doc for batch in iter_documents_batched("val", data_dir=tmp_path) for doc in batch] == shard_texts(2)


def test_row_groups_resume_from_a_position_and_loop_over_epochs(tmp_path):
    for i in range(2):
        write_shard(tmp_path / shard_name(i), shard_texts(i))
    stream = iter_row_groups("train", data_dir=tmp_path, loop=True)
    positions = [next(stream)[0] for _ in range(7)]  # 3 row groups per epoch
    assert [(p.epoch, p.row_group) for p in positions] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    resumed = iter_row_groups("train", data_dir=tmp_path, resume_from=positions[4], loop=True)
    assert [next(resumed)[0] for _ in range(3)] == positions[4:7]


def test_too_few_shards_or_row_groups_fail_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset"):
        list(iter_documents_batched("train", data_dir=tmp_path))
    for i in range(2):
        write_shard(tmp_path / shard_name(i), ["one document"])
    with pytest.raises(ValueError, match="fewer ranks"):
        next(iter_row_groups("train", 1, 2, tmp_path, loop=True))
    with pytest.raises(ValueError, match="split must be"):
        list(iter_documents_batched("test", data_dir=tmp_path))


def test_the_mirror_is_read_in_place():
    shards = list_shards()
    assert [p.name for p in shards] == [shard_name(i) for i in range(3)]
    assert shards[0].parent.name == "fineweb"


# -----------------------------------------------------------------------------
# Downloading, against a local server that misbehaves on purpose


@contextmanager
def flaky_server(served: Path, plans: dict[str, list[str]]):
    """Serves files of `served`; each request for a name takes the next failure of its plan, then succeeds:
    "500" an HTTP error, "truncate" half the body under the full Content-Length, "lie" half the body under a
    matching Content-Length (only the parquet check can tell), "drop" a closed connection with no response."""
    requests: Counter[str] = Counter()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            with lock:
                attempt = requests[name]
                requests[name] += 1
            plan = plans.get(name, [])
            behaviour = plan[attempt] if attempt < len(plan) else "ok"
            path = served / name
            if behaviour == "drop":
                self.close_connection = True
                return
            if behaviour == "500" or not path.exists():
                self.send_error(500 if path.exists() else 404)
                return
            data = path.read_bytes()
            body = data[: len(data) // 2] if behaviour in ("truncate", "lie") else data
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) if behaviour == "lie" else len(data)))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/shards", requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("NANOCHAT_DATA_DIR")  # no mirror: every shard comes over HTTP
    directory = tmp_path / "served"
    for i in [*range(6), MAX_SHARD]:
        write_shard(directory / shard_name(i), shard_texts(i))
    return directory


def test_downloader_ends_with_only_valid_shards_despite_a_flaky_server(served, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / shard_name(4)).write_bytes(b"PAR1 half a file from an older tool")  # corrupt: replaced
    (dest / shard_name(5)).write_bytes((served / shard_name(5)).read_bytes())  # already valid: skipped
    plans = {shard_name(0): ["500", "truncate", "drop"], shard_name(1): ["drop", "lie"], shard_name(2): ["lie"],
             shard_name(3): ["truncate"] * 10}  # shard 3 never arrives whole within the retries
    with flaky_server(served, plans) as (url, requests):
        done, failed = download_shards(list(range(6)), dest, url, workers=3, retries=3, backoff=0.001,
                                       progress=False)
    assert list(failed) == [3] and "failed after 4 attempts" in failed[3]
    assert sorted(p.name for p in dest.iterdir()) == [shard_name(i) for i in (0, 1, 2, 4, 5)]  # no temp files
    assert done == [dest / shard_name(i) for i in (0, 1, 2, 4, 5)]
    for i in (0, 1, 2, 4, 5):
        validate_shard(dest / shard_name(i))
        assert pq.read_table(dest / shard_name(i)).column("text").to_pylist() == shard_texts(i)
    assert requests[shard_name(0)] == 4 and requests[shard_name(3)] == 4
    assert requests[shard_name(5)] == 0


def test_a_missing_shard_fails_at_once_with_the_fix(served, tmp_path):
    with flaky_server(served, {}) as (url, requests), pytest.raises(RuntimeError, match="HTTP 404.*--base-url"):
        download_shard(99, tmp_path, url, retries=3, backoff=0.001)
    assert requests[shard_name(99)] == 1  # a 404 is permanent: no retries
    assert list(tmp_path.glob("*shard_00099*")) == []


def test_cli_fetches_n_train_shards_plus_the_validation_shard(served, tmp_path, capsys):
    dest = tmp_path / "dest"
    with flaky_server(served, {shard_name(1): ["500"]}) as (url, _):
        assert main(["-n", "2", "-w", "2", "--base-url", url, "--dest", str(dest), "--backoff", "0.001"]) == 0
        assert sorted(p.name for p in dest.iterdir()) == [shard_name(0), shard_name(1), shard_name(MAX_SHARD)]
        assert list_shards(dest)[-1].name == shard_name(MAX_SHARD)  # the validation split sorts last
        # a shard the server does not have: exit code 1 and a message that says how to retry
        assert main(["-n", "7", "--base-url", url, "--dest", str(dest), "--backoff", "0.001", "--retries", "0"]) == 1
    assert "re-run the same command" in capsys.readouterr().err


def test_cli_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit):
        main(["-n", "0"])
    assert "-n must be between 1" in capsys.readouterr().err


def test_shards_the_mirror_holds_are_copied_not_downloaded(tmp_path):
    path = download_shard(0, tmp_path, base_url="http://127.0.0.1:9/unreachable", retries=0)
    validate_shard(path)
    assert path.read_bytes() == (Path(list_shards()[0])).read_bytes()


# -----------------------------------------------------------------------------
# Corpora other than FineWeb: ClimbMix, through the same download code


def test_climbmix_downloads_into_its_own_directory_through_the_same_checks(served, tmp_path, base_dir):
    climbmix = CORPORA["climbmix"]
    for i in (0, 1, climbmix.max_shard):
        write_shard(served / climbmix.shard_name(i), shard_texts(i))
    # shard 0 arrives corrupt (half a file under a matching length: only the parquet check can tell), then whole
    plans = {climbmix.shard_name(0): ["lie"], climbmix.shard_name(1): ["500"]}
    with flaky_server(served, plans) as (url, requests):
        assert main(["--corpus", "climbmix", "-n", "2", "-w", "2", "--base-url", url, "--backoff", "0.001"]) == 0
    dest = base_dir / "base_data_climbmix"
    assert default_shard_dir("climbmix") == dest  # where training reads it (no mirror here)
    assert [p.name for p in list_shards(dest)] == ["shard_00000.parquet", "shard_00001.parquet", "shard_06542.parquet"]
    assert pq.read_table(dest / climbmix.shard_name(0)).column("text").to_pylist() == shard_texts(0)
    assert requests[climbmix.shard_name(0)] == 2 and requests[climbmix.shard_name(1)] == 2
    assert not (base_dir / "base_data").exists()  # FineWeb's directory is untouched


def test_a_corpus_reads_its_own_mirror_and_never_another_corpus_mirror(tmp_path, monkeypatch):
    # the shared mirror holds fineweb only: climbmix is not copied from it
    assert default_shard_dir("climbmix").name == "base_data_climbmix"
    with pytest.raises(ShardDownloadError):
        download_shard(0, tmp_path, "http://127.0.0.1:9/unreachable", retries=0, corpus="climbmix")
    mirror = tmp_path / "mirror"
    write_shard(mirror / "climbmix" / shard_name(0), shard_texts(0))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(mirror))
    assert default_shard_dir("climbmix") == mirror / "climbmix"
    copied = download_shard(0, tmp_path / "dest", "http://127.0.0.1:9/unreachable", retries=0, corpus="climbmix")
    assert copied.read_bytes() == (mirror / "climbmix" / shard_name(0)).read_bytes()


def test_cli_bounds_n_by_the_chosen_corpus(capsys):
    with pytest.raises(SystemExit):
        main(["--corpus", "climbmix", "-n", "6543"])
    assert "between 1 and 6542 train shards of climbmix" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--corpus", "dolma"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown corpus 'dolma'"):
        default_shard_dir("dolma")
