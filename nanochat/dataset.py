"""The pretraining corpus: FineWeb-Edu as numbered parquet shards (shard_00000.parquet, ...) with a `text` column.

The local mirror ($NANOCHAT_DATA_DIR/fineweb/) is used when present, else $NANOCHAT_BASE_DIR/base_data/.
The last shard is the validation split.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from nanochat.common import get_base_dir, mirror_path


def default_shard_dir() -> Path:
    return mirror_path("fineweb") or get_base_dir() / "base_data"


def list_shards(data_dir: Path | None = None) -> list[Path]:
    data_dir = Path(data_dir) if data_dir is not None else default_shard_dir()
    return sorted(data_dir.glob("shard_*.parquet"))


def iter_documents_batched(split: str, start: int = 0, step: int = 1, data_dir: Path | None = None) -> Iterator[list[str]]:
    """Yield the documents of a split one parquet row group at a time; row groups are strided by (start, step)
    so DDP ranks read disjoint parts."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    shards = list_shards(data_dir)
    if len(shards) < 2:
        where = data_dir or default_shard_dir()
        raise FileNotFoundError(f"need at least 2 pretraining shards (train + val) in {where}, found {len(shards)}: "
                                "download them with `python -m nanochat.dataset -n 8` or set NANOCHAT_DATA_DIR")
    shards = shards[:-1] if split == "train" else shards[-1:]
    group_index = 0
    for shard in shards:
        parquet = pq.ParquetFile(shard)
        for rg in range(parquet.num_row_groups):
            if group_index % step == start:
                yield parquet.read_row_group(rg, columns=["text"]).column("text").to_pylist()
            group_index += 1
