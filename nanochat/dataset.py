"""The pretraining corpora: numbered parquet shards (shard_00000.parquet, ...), each with a `text` column, the last
shard the validation split. `CORPORA` names them: `fineweb` (the default), FineWeb-Edu as re-packaged (100B tokens,
shuffled, ~250M characters per shard, shards 0..1822) for the original nanochat, and `climbmix`, NVIDIA's ClimbMix
(400B tokens) in the same shard format (shards 0..6542).

Reading: the local mirror ($NANOCHAT_DATA_DIR/<corpus.mirror_subdir>/, used in place) when present, else
$NANOCHAT_BASE_DIR/<corpus.local_subdir>/. The downloader always fetches the corpus's last shard for validation.
Documents come one parquet row group at a time; DDP ranks take row groups round-robin.

Downloading: `python -m nanochat.dataset [--corpus climbmix] -n 8` fetches train shards 0..7 plus the validation shard
in parallel, with
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


@dataclass(frozen=True)
class Corpus:
    """Where a pretraining corpus's shards live: upstream (base_url/<shard name>), in the local mirror
    ($NANOCHAT_DATA_DIR/<mirror_subdir>) and once downloaded ($NANOCHAT_BASE_DIR/<local_subdir>)."""
    base_url: str
    max_shard: int  # the last shard's index; always the validation split
    mirror_subdir: str
    local_subdir: str
    shard_pattern: str = "shard_{index:05d}.parquet"  # must match list_shards' glob

    def shard_name(self, index: int) -> str:
        return self.shard_pattern.format(index=index)


CORPORA = {
    "fineweb": Corpus(base_url="https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
                      max_shard=1822, mirror_subdir="fineweb", local_subdir="base_data"),
    # NVIDIA publishes ClimbMix (huggingface.co/datasets/nvidia/ClimbMix, arXiv 2504.13161) as GPT-2 token ids, to be
    # detokenized with their script; karpathy/climbmix-400b-shuffle is its text re-packaged (shuffled) into the
    # FineWeb layout above: shard_00000 .. shard_06542.parquet with a `text` column, the last pinned as validation.
    # Those facts come from the nvidia/ClimbMix dataset card and from public code that downloads the re-packaged
    # shards (upstream nanochat's and autoresearch's dataset.py/prepare.py: this BASE_URL, MAX_SHARD = 6542, the name
    # pattern, base_data_climbmix). Assumed, not verified here (the hub is unreachable from this machine): that the
    # shards are ~100MB each and every one has a `text` column; validate_shard refuses any that does not.
    "climbmix": Corpus(base_url="https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
                       max_shard=6542, mirror_subdir="climbmix", local_subdir="base_data_climbmix"),
}
DEFAULT_CORPUS = "fineweb"
BASE_URL = CORPORA["fineweb"].base_url
MAX_SHARD = CORPORA["fineweb"].max_shard


def shard_name(index: int) -> str:
    return CORPORA[DEFAULT_CORPUS].shard_name(index)


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}: choose one of {', '.join(CORPORA)}")
    return CORPORA[name]


def default_shard_dir(corpus: str = DEFAULT_CORPUS) -> Path:
    """Where training reads a corpus: the mirror's copy in place, else the downloaded shards."""
    spec = get_corpus(corpus)
    return mirror_path(spec.mirror_subdir) or get_base_dir() / spec.local_subdir


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
                                "download them with `python -m nanochat.dataset [--corpus NAME] -n 8` or set "
                                "NANOCHAT_DATA_DIR")
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
                yield position, read_row_group(parquet, row_group)
        if group_index <= start:
            raise ValueError(f"the {split} split has {group_index} row groups in {len(shards)} shards, too few for "
                             f"reader {start} of {step}: download more shards or use fewer ranks")
        if not loop:
            return
        epoch += 1


def read_row_group(parquet: pq.ParquetFile | Path, row_group: int) -> list[str]:
    """The texts of one row group of a shard (an open ParquetFile or its path)."""
    if not isinstance(parquet, pq.ParquetFile):
        parquet = pq.ParquetFile(parquet)
    return parquet.read_row_group(row_group, columns=["text"]).column("text").to_pylist()


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


def download_shard(index: int, dest_dir: Path, base_url: str | None = None, retries: int = 5, backoff: float = 2.0,
                   timeout: float = 60.0, corpus: str = DEFAULT_CORPUS) -> Path:
    """Make dest_dir/shard_XXXXX.parquet a valid shard of `corpus`: keep it if it already is one, else copy it from the
    mirror or download it (from base_url, default the corpus's), retrying failures (HTTP errors, dropped connections,
    truncated or invalid files) up to `retries` times with exponential backoff (backoff, 2*backoff, ... seconds)."""
    spec = get_corpus(corpus)
    name = spec.shard_name(index)
    path = dest_dir / name
    if path.exists():
        if is_valid_shard(path):
            return path
        path.unlink()  # corrupt leftover (e.g. from a tool that does not write atomically): fetch it again

    mirror = mirror_path(spec.mirror_subdir, name)
    # a mirror's copy goes through the same length and parquet checks as a download, as a file:// URL
    source = mirror.resolve().as_uri() if mirror is not None else f"{(base_url or spec.base_url).rstrip('/')}/{name}"
    try:
        return download_file(source, path, retries=retries, backoff_seconds=backoff, timeout=timeout,
                             validate=validate_shard)
    except DownloadError as e:
        if e.status is not None:
            raise ShardDownloadError(f"{source}: HTTP {e.status}, which retrying will not fix: check the shard index "
                                     f"(0..{spec.max_shard}) and --base-url / NANOCHAT_SHARD_URL") from e
        raise ShardDownloadError(str(e)) from e


def download_shards(indices: list[int], dest_dir: Path, base_url: str | None = None, workers: int = 8,
                    retries: int = 5, backoff: float = 2.0, timeout: float = 60.0, progress: bool = True,
                    corpus: str = DEFAULT_CORPUS) -> tuple[list[Path], dict[int, str]]:
    """Download shards in parallel threads (the work is network-bound). Returns (valid paths, {index: error})."""
    from tqdm import tqdm

    dest_dir.mkdir(parents=True, exist_ok=True)
    done: list[Path] = []
    failed: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(download_shard, i, dest_dir, base_url, retries, backoff, timeout, corpus): i
                   for i in indices}
        with tqdm(total=len(indices), unit="shard", desc="shards", disable=not progress) as bar:
            for future in as_completed(futures):
                try:
                    done.append(future.result())
                except ShardDownloadError as e:
                    failed[futures[future]] = str(e)
                bar.update(1)
    return sorted(done), failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Download pretraining shards of a corpus (train shards 0..N-1 plus "
                                                 "its last shard, the validation split)")
    parser.add_argument("--corpus", choices=list(CORPORA), default=DEFAULT_CORPUS,
                        help=f"which corpus (default {DEFAULT_CORPUS}): " + ", ".join(
                            f"{name} {spec.max_shard} train shards" for name, spec in CORPORA.items()))
    parser.add_argument("-n", "--num-shards", type=int, default=-1,
                        help="number of train shards to download (-1 = all); ~100MB each")
    parser.add_argument("-w", "--workers", type=int, default=8, help="parallel downloads")
    parser.add_argument("--base-url", default=None,
                        help="where the shards live (default: the corpus's Hugging Face dataset; for fineweb "
                             "$NANOCHAT_SHARD_URL when set)")
    parser.add_argument("--dest", type=Path, default=None,
                        help="output directory (default: $NANOCHAT_BASE_DIR/base_data for fineweb, "
                             "base_data_<corpus> for the others)")
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds, doubling each time")
    args = parser.parse_args(argv)
    spec = CORPORA[args.corpus]
    if args.num_shards < -1 or args.num_shards == 0 or args.num_shards > spec.max_shard:
        parser.error(f"-n must be between 1 and {spec.max_shard} train shards of {args.corpus}, or -1 for all")
    if args.workers < 1:
        parser.error("-w must be at least 1")
    if args.retries < 0:
        parser.error("--retries must be at least 0")

    # NANOCHAT_SHARD_URL predates the registry and names a FineWeb server: another corpus never reads from it
    env_url = os.environ.get("NANOCHAT_SHARD_URL") if args.corpus == "fineweb" else None
    base_url = args.base_url or env_url or spec.base_url
    dest = args.dest or get_base_dir() / spec.local_subdir
    num_train = spec.max_shard if args.num_shards == -1 else args.num_shards
    indices = [*range(num_train), spec.max_shard]
    mirror = mirror_path(spec.mirror_subdir)
    if mirror is not None and args.dest is None:
        print(f"note: the local mirror {mirror} holds {len(list_shards(mirror))} shards and training reads it in "
              f"place while NANOCHAT_DATA_DIR={get_data_dir()} is set; shards it holds are copied, not downloaded")
    print(f"downloading {len(indices)} {args.corpus} shards ({num_train} train + validation shard {spec.max_shard}) "
          f"from {base_url} to {dest} with {args.workers} workers")
    done, failed = download_shards(indices, dest, base_url, args.workers, args.retries, args.backoff,
                                   corpus=args.corpus)
    print(f"{len(done)}/{len(indices)} shards valid in {dest}")
    if failed:
        for index, error in sorted(failed.items()):
            print(f"  shard {index}: {error}", file=sys.stderr)
        print("re-run the same command to retry the missing shards (valid ones are skipped)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
