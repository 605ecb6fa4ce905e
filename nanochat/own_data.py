"""Your own pretraining text (`--data PATH` of base_train and tok_train) as a shard directory the loader reads.

PATH is one of:
- a directory of parquet shards named shard_*.parquet with a `text` column: used in place, like FineWeb's (the last
  shard in sorted order is the validation split);
- .jsonl files, or a directory of them: each non-blank line an object with a string "text";
- .txt files, or a directory of them: each file one document;
- .parquet files of other names (with a `text` column): read like the two above.

Anything but a shard directory used in place is converted once into $NANOCHAT_BASE_DIR/own_data/<name>-<hash>/, where
<hash> is over the input files' names and contents, so changed text gets a new directory and unchanged text is never
converted twice (tok_train and base_train share it). The directory holds shard_00000.parquet ... in the FineWeb
layout (a `text` column, row groups of ROW_GROUP_DOCS documents, at most SHARD_CHARS characters per shard): the
documents of every input file but the last, in sorted order, then one validation shard with the last file's
documents; with `--val-data VAL`, all of PATH is train and VAL's documents are the validation shard. The shards are
written into a temporary directory that is renamed into place only when complete, so a crash never leaves a
half-written cache (at worst an unused `.<name>-<hash>.tmp-*` directory beside it).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import get_base_dir
from nanochat.dataset import shard_name
from tasks.common import MalformedDataError

SUFFIXES = (".parquet", ".jsonl", ".txt")
ROW_GROUP_DOCS = 1024  # row groups are what DDP ranks deal round-robin and what the loader tokenizes at once
SHARD_CHARS = 250_000_000  # about a FineWeb shard
FORMAT_VERSION = "1"  # part of the hash: bump it when the layout above changes


def prepare_own_data(data: Path, val_data: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The shard directory for `data` (and `val_data`): `data` itself when it is a shard directory used in place,
    else the cache, converted now if it is not there yet. Bad input raises MalformedDataError naming the file."""
    train_files = input_files(Path(data), "--data")
    val_files = input_files(Path(val_data), "--val-data") if val_data is not None else []
    if val_data is None and len(train_files) < 2:
        raise MalformedDataError(f"--data {data} holds {len(train_files)} file: its last file is the validation "
                                 "split, so give a directory of at least 2 files, or (base_train) name the "
                                 "validation text with --val-data VAL")
    if val_data is None and Path(data).is_dir() and all(is_shard(file) for file in train_files):
        for file in train_files:
            check_parquet(file)
        return Path(data)

    directory = get_base_dir() / "own_data" / f"{safe_name(Path(data))}-{content_hash(train_files, val_files)}"
    if directory.is_dir():  # only ever renamed into place complete
        return directory
    if not val_files:
        train_files, val_files = train_files[:-1], train_files[-1:]
    log(f"converting {len(train_files)} train and {len(val_files)} validation file(s) into {directory}")
    write_cache(directory, train_files, val_files)
    return directory


# -----------------------------------------------------------------------------
# The input files


def input_files(path: Path, flag: str) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise MalformedDataError(f"{flag} {path} is not a {', '.join(SUFFIXES)} file")
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file() and not p.name.startswith("."))
    if not files:
        raise MalformedDataError(f"{flag} {path} holds no {', '.join(SUFFIXES)} files: put your text there")
    kinds = sorted({file.suffix for file in files})
    if len(kinds) > 1:
        raise MalformedDataError(f"{flag} {path} holds {' and '.join(kinds)} files: keep one kind per directory")
    return files


def is_shard(file: Path) -> bool:
    return re.fullmatch(r"shard_\d+\.parquet", file.name) is not None


def check_parquet(file: Path) -> None:
    try:
        schema = pq.read_schema(file)
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for a bad file
        raise MalformedDataError(f"{file} is not a readable parquet file ({e}): replace it") from e
    if "text" not in schema.names:
        raise MalformedDataError(f"{file} has no 'text' column (columns: {schema.names}): name the column of "
                                 "documents 'text'")
    if not pa.types.is_string(schema.field("text").type) and not pa.types.is_large_string(schema.field("text").type):
        raise MalformedDataError(f"{file}: the 'text' column is {schema.field('text').type}, not strings")


def safe_name(path: Path) -> str:
    name = path.resolve().stem if path.is_file() else path.resolve().name
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "data"


def content_hash(train_files: list[Path], val_files: list[Path]) -> str:
    digest = hashlib.sha256(FORMAT_VERSION.encode())
    for role, files in (("train", train_files), ("val", val_files)):
        for file in files:
            digest.update(f"\0{role}\0{file.name}\0".encode())
            with file.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


# -----------------------------------------------------------------------------
# Reading documents


def iter_documents(file: Path) -> Iterator[str]:
    """The non-empty documents of one input file; malformed input raises MalformedDataError with file and line."""
    count = 0
    for document in _read_documents(file):
        if document:
            count += 1
            yield document
    if count == 0:
        raise MalformedDataError(f"{file} holds no text: add documents or remove the file")


def _read_documents(file: Path) -> Iterator[str]:
    if file.suffix == ".parquet":
        check_parquet(file)
        parquet = pq.ParquetFile(file)
        row = 0
        for row_group in range(parquet.num_row_groups):
            for text in parquet.read_row_group(row_group, columns=["text"]).column("text").to_pylist():
                row += 1
                if text is None:
                    raise MalformedDataError(f"{file}: row {row} has a null 'text': drop or fill it")
                yield text
        return
    try:
        if file.suffix == ".txt":
            yield file.read_text(encoding="utf-8")
            return
        with file.open(encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    yield jsonl_text(file, line_number, line)
    except UnicodeDecodeError as e:
        raise MalformedDataError(f"{file} is not UTF-8 text ({e}): re-encode it as UTF-8") from e


def jsonl_text(file: Path, line_number: int, line: str) -> str:
    where = f"{file}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise MalformedDataError(f"{where}: not valid JSON ({e}): each line must be {{\"text\": \"...\"}}") from e
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        shown = line.strip()[:80]
        raise MalformedDataError(f"{where}: expected an object with a string \"text\", got {shown}: each line must "
                                 "be {\"text\": \"...\"}")
    return record["text"]


# -----------------------------------------------------------------------------
# Writing the cache


def write_cache(directory: Path, train_files: list[Path], val_files: list[Path]) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        index = write_shards(tmp, 0, (doc for file in train_files for doc in iter_documents(file)), SHARD_CHARS)
        write_shards(tmp, index, (doc for file in val_files for doc in iter_documents(file)), None)
        try:
            tmp.rename(directory)
        except OSError:
            if not directory.is_dir():  # not a concurrent writer's identical copy that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_shards(directory: Path, first_index: int, documents: Iterator[str], max_chars: int | None) -> int:
    """Write the documents as shards numbered from first_index, a new one after max_chars characters (None: one
    shard); returns the next free index."""
    index, writer, chars, row_group = first_index, None, 0, []
    schema = pa.schema([("text", pa.string())])

    def flush() -> None:
        writer.write_table(pa.table({"text": row_group}, schema=schema), row_group_size=ROW_GROUP_DOCS)
        row_group.clear()

    for document in documents:
        if writer is None:
            writer = pq.ParquetWriter(directory / shard_name(index), schema)
        row_group.append(document)
        chars += len(document)
        if len(row_group) == ROW_GROUP_DOCS:
            flush()
        if max_chars is not None and chars >= max_chars:
            if row_group:
                flush()
            writer.close()
            writer, chars, index = None, 0, index + 1
    if writer is not None:
        if row_group:
            flush()
        writer.close()
        index += 1
    return index
