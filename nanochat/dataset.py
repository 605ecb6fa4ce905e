"""The pretraining corpus: FineWeb-Edu as numbered parquet shards (shard_00000.parquet ... shard_01822.parquet), each
with a `text` column, as re-packaged (100B tokens, shuffled, ~250M characters per shard) for the original nanochat.

Reading: the local mirror ($NANOCHAT_DATA_DIR/fineweb/, used in place) when present, else $NANOCHAT_BASE_DIR/base_data/.
The last shard (in sorted order) is the validation split: the downloader always fetches shard 1822 for it.
Documents come one parquet row group at a time; DDP ranks take row groups round-robin.

Downloading: `python -m nanochat.dataset -n 8` fetches train shards 0..7 plus the validation shard in parallel, with
retries and exponential backoff. Each shard is written under a temporary name, checked (parquet footer readable, a
`text` column, at least one row) and only then renamed into place, so a shard on disk is either complete or absent;
re-running skips valid shards and replaces corrupt ones. Shards the mirror holds are copied from it instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from nanochat.common import get_base_dir, get_data_dir, mirror_path
from nanochat.download import DownloadError, download_file

BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
MAX_SHARD = 1822  # the last shard of the dataset; always the validation split


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def default_shard_dir() -> Path:
    return mirror_path("fineweb") or get_base_dir() / "base_data"


def list_shards(data_dir: Path | None = None) -> list[Path]:
    data_dir = Path(data_dir) if data_dir is not None else default_shard_dir()
    return sorted(data_dir.glob("shard_*.parquet"))


# -----------------------------------------------------------------------------
# Reading documents


@dataclass(frozen=True, order=True)
class RowGroupPosition:
    """Where a row group sits in a split: the pass over the data (epoch), the shard's index in the split's sorted
    shard list, the row group within the shard. Ordered, so a reader can resume "from position p onwards"."""
    epoch: int
    shard: int
    row_group: int


def split_shards(split: str, data_dir: Path | None = None) -> list[Path]:
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    shards = list_shards(data_dir)
    if len(shards) < 2:
        where = data_dir or default_shard_dir()
        raise FileNotFoundError(f"need at least 2 pretraining shards (train + val) in {where}, found {len(shards)}: "
                                "download them with `python -m nanochat.dataset -n 8` or set NANOCHAT_DATA_DIR")
    return shards[:-1] if split == "train" else shards[-1:]


def iter_row_groups(split: str, start: int = 0, step: int = 1, data_dir: Path | None = None,
                    resume_from: RowGroupPosition | None = None, loop: bool = False,
                    ) -> Iterator[tuple[RowGroupPosition, list[str]]]:
    """Yield (position, texts) for the row groups of a split, row groups dealt round-robin across all shards of the
    split: this reader gets those whose running index i has i % step == start. With `loop`, passes repeat forever
    (epoch += 1). Row groups before `resume_from` are skipped without being read (only footers are)."""
    shards = split_shards(split, data_dir)
    if not 0 <= start < step:
        raise ValueError(f"need 0 <= start < step, got start={start} step={step}")
    epoch = resume_from.epoch if resume_from is not None else 0
    while True:
        group_index = 0
        for shard_index, shard in enumerate(shards):
            parquet = pq.ParquetFile(shard)
            for row_group in range(parquet.num_row_groups):
                position = RowGroupPosition(epoch, shard_index, row_group)
                mine = group_index % step == start
                group_index += 1
                if not mine or (resume_from is not None and position < resume_from):
                    continue
                yield position, parquet.read_row_group(row_group, columns=["text"]).column("text").to_pylist()
        if group_index <= start:
            raise ValueError(f"the {split} split has {group_index} row groups in {len(shards)} shards, too few for "
                             f"reader {start} of {step}: download more shards or use fewer ranks")
        if not loop:
            return
        epoch += 1


def iter_documents_batched(split: str, start: int = 0, step: int = 1, data_dir: Path | None = None
                           ) -> Iterator[list[str]]:
    """Yield the documents of a split one parquet row group at a time, one pass; row groups are strided by
    (start, step) so DDP ranks read disjoint parts."""
    for _position, texts in iter_row_groups(split, start, step, data_dir):
        yield texts


# -----------------------------------------------------------------------------
# Downloading


class ShardDownloadError(RuntimeError):
    pass


def validate_shard(path: Path) -> None:
    """Raise ValueError unless `path` is a readable parquet file with a `text` column and at least one row. Truncated
    files fail here: the parquet footer (schema, row groups) sits at the very end."""
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for a bad file
        raise ValueError(f"{path} is not a readable parquet file ({e})") from e
    if "text" not in parquet.schema_arrow.names:
        raise ValueError(f"{path} has no 'text' column (columns: {parquet.schema_arrow.names})")
    if parquet.metadata.num_rows == 0:
        raise ValueError(f"{path} has no rows")


def is_valid_shard(path: Path) -> bool:
    try:
        validate_shard(path)
    except ValueError:
        return False
    return True


def download_shard(index: int, dest_dir: Path, base_url: str = BASE_URL, retries: int = 5, backoff: float = 2.0,
                   timeout: float = 60.0) -> Path:
    """Make dest_dir/shard_XXXXX.parquet a valid shard: keep it if it already is one, else copy it from the mirror
    or download it, retrying failures (HTTP errors, dropped connections, truncated or invalid files) up to `retries`
    times with exponential backoff (backoff, 2*backoff, 4*backoff, ... seconds)."""
    name = shard_name(index)
    path = dest_dir / name
    if path.exists():
        if is_valid_shard(path):
            return path
        path.unlink()  # corrupt leftover (e.g. from a tool that does not write atomically): fetch it again

    mirror = mirror_path("fineweb", name)
    # a mirror's copy goes through the same length and parquet checks as a download, as a file:// URL
    source = mirror.resolve().as_uri() if mirror is not None else f"{base_url.rstrip('/')}/{name}"
    try:
        return download_file(source, path, retries=retries, backoff_seconds=backoff, timeout=timeout,
                             validate=validate_shard)
    except DownloadError as e:
        if e.status is not None:
            raise ShardDownloadError(f"{source}: HTTP {e.status}, which retrying will not fix: check the shard index "
                                     f"(0..{MAX_SHARD}) and --base-url / NANOCHAT_SHARD_URL") from e
        raise ShardDownloadError(str(e)) from e


def download_shards(indices: list[int], dest_dir: Path, base_url: str = BASE_URL, workers: int = 8,
                    retries: int = 5, backoff: float = 2.0, timeout: float = 60.0, progress: bool = True
                    ) -> tuple[list[Path], dict[int, str]]:
    """Download shards in parallel threads (the work is network-bound). Returns (valid paths, {index: error})."""
    from tqdm import tqdm

    dest_dir.mkdir(parents=True, exist_ok=True)
    done: list[Path] = []
    failed: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(download_shard, i, dest_dir, base_url, retries, backoff, timeout): i for i in indices}
        with tqdm(total=len(indices), unit="shard", desc="shards", disable=not progress) as bar:
            for future in as_completed(futures):
                try:
                    done.append(future.result())
                except ShardDownloadError as e:
                    failed[futures[future]] = str(e)
                bar.update(1)
    return sorted(done), failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download FineWeb-Edu pretraining shards (train shards 0..N-1 plus "
                                                 f"the validation shard {MAX_SHARD})")
    parser.add_argument("-n", "--num-shards", type=int, default=-1,
                        help=f"number of train shards to download (-1 = all {MAX_SHARD}); ~100MB each")
    parser.add_argument("-w", "--workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--base-url", default=os.environ.get("NANOCHAT_SHARD_URL", BASE_URL),
                        help="where the shards live (default: $NANOCHAT_SHARD_URL or the Hugging Face dataset)")
    parser.add_argument("--dest", type=Path, default=None, help="output directory (default: $NANOCHAT_BASE_DIR/base_data)")
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds, doubling each time")
    args = parser.parse_args(argv)
    if args.num_shards < -1 or args.num_shards == 0 or args.num_shards > MAX_SHARD:
        parser.error(f"-n must be between 1 and {MAX_SHARD} train shards, or -1 for all")
    if args.workers < 1:
        parser.error("-w must be at least 1")
    if args.retries < 0:
        parser.error("--retries must be at least 0")

    dest = args.dest or get_base_dir() / "base_data"
    num_train = MAX_SHARD if args.num_shards == -1 else args.num_shards
    indices = [*range(num_train), MAX_SHARD]
    mirror = mirror_path("fineweb")
    if mirror is not None and args.dest is None:
        print(f"note: the local mirror {mirror} holds {len(list_shards(mirror))} shards and training reads it in "
              f"place while NANOCHAT_DATA_DIR={get_data_dir()} is set; shards it holds are copied, not downloaded")
    print(f"downloading {len(indices)} shards ({num_train} train + validation shard {MAX_SHARD}) from "
          f"{args.base_url} to {dest} with {args.workers} workers")
    done, failed = download_shards(indices, dest, args.base_url, args.workers, args.retries, args.backoff)
    print(f"{len(done)}/{len(indices)} shards valid in {dest}")
    if failed:
        for index, error in sorted(failed.items()):
            print(f"  shard {index}: {error}", file=sys.stderr)
        print("re-run the same command to retry the missing shards (valid ones are skipped)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
