"""Train the BPE tokenizer and save it to $NANOCHAT_BASE_DIR/tokenizer (plus token_bytes.pt for bits per byte).

    python -m scripts.tok_train                                   # 2B chars of the pretraining shards, vocab 65536
    python -m scripts.tok_train --max-chars 1e7 --vocab-size 4096 --input notes.txt books/

Text comes from the pretraining shards' train split (the last shard is validation and never seen), from
another shard directory (--data-dir), from the train split of your own pretraining text (--data, as base_train
reads it: nanochat/own_data.py), or from any files (--input): parquet with a text column, or .txt
(one document per blank-line-separated paragraph). Each document is cropped to --doc-cap characters so a few
huge documents cannot dominate the pair counts.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import torch

from nanochat.common import atomic_torch_save, get_base_dir
from nanochat.dataset import default_shard_dir, iter_documents_batched, list_shards
from nanochat.own_data import prepare_own_data
from nanochat.tokenizer import SPECIAL_TOKENS, TOKEN_BYTES_FILE, Tokenizer
from report import TOKENIZER_TRAINING, get_report

INPUT_SUFFIXES = (".parquet", ".txt")

# -----------------------------------------------------------------------------
# Flags


def parse_count(value: str) -> int:
    """Counts like 2e9 or 2000000000."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number like 2e9, got {value!r}") from None
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}")
    return int(number)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the BPE tokenizer (rustbpe) on text.")
    parser.add_argument("--max-chars", type=parse_count, default=2_000_000_000,
                        help="stop after this many characters of text (default 2e9)")
    parser.add_argument("--doc-cap", type=parse_count, default=10_000, help="characters kept per document")
    parser.add_argument("--vocab-size", type=parse_count, default=65536,
                        help=f"tokens in the vocabulary, counting the {len(SPECIAL_TOKENS)} special tokens")
    text_source = parser.add_mutually_exclusive_group()
    text_source.add_argument("--data-dir", type=Path,
                        help="a directory of pretraining shards (shard_*.parquet; its last shard is left out as "
                             "validation); default: the mirror's or $NANOCHAT_BASE_DIR/base_data")
    text_source.add_argument("--input", type=Path, nargs="+",
                        help="parquet files (with --text-column), .txt files, or directories of them")
    text_source.add_argument("--data", type=Path,
                        help="your own pretraining text, as base_train --data takes it (its last file is left out "
                             "as validation)")
    parser.add_argument("--text-column", default="text", help="the parquet column holding the text of --input")
    args = parser.parse_args(argv)

    min_vocab = 256 + len(SPECIAL_TOKENS)
    if args.vocab_size < min_vocab:
        parser.error(f"--vocab-size {args.vocab_size} is too small: it must be at least {min_vocab} "
                     f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
    if args.max_chars <= 0:
        parser.error(f"--max-chars must be positive, got {args.max_chars}")
    if args.doc_cap <= 0:
        parser.error(f"--doc-cap must be positive, got {args.doc_cap}")
    try:
        if args.input is not None:
            args.input = resolve_input_files(args.input, args.text_column)
        elif args.data is not None:
            args.data = prepare_own_data(args.data)  # the shard directory, converted once and cached
        else:
            check_shards(args.data_dir)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return args


def resolve_input_files(paths: list[Path], text_column: str) -> list[Path]:
    """Expand directories, check every file exists, has a known type and (parquet) holds the text column."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in INPUT_SUFFIXES and p.is_file())
            if not found:
                raise ValueError(f"--input directory {path} holds no .parquet or .txt files")
            files.extend(found)
        elif not path.exists():
            raise ValueError(f"--input path {path} does not exist")
        elif path.suffix not in INPUT_SUFFIXES:
            raise ValueError(f"--input file {path} is neither .parquet nor .txt")
        else:
            files.append(path)
    for file in files:
        if file.suffix != ".parquet":
            continue
        columns = pq.read_schema(file).names
        if text_column not in columns:
            raise ValueError(f"{file} has no {text_column!r} column (it has {columns}): pick one with --text-column")
    return files


def check_shards(data_dir: Path | None) -> None:
    where = data_dir if data_dir is not None else default_shard_dir()
    if data_dir is not None and not data_dir.is_dir():
        raise ValueError(f"--data-dir {data_dir} is not a directory")
    shards = list_shards(data_dir)
    if len(shards) < 2:
        raise ValueError(f"need at least 2 pretraining shards (train + val) in {where}, found {len(shards)}: download "
                         "them with `python -m nanochat.dataset -n 8`, set NANOCHAT_DATA_DIR, or pass --input")


# -----------------------------------------------------------------------------
# The text stream


def iter_file_documents(files: list[Path], text_column: str) -> Iterator[list[str]]:
    for file in files:
        if file.suffix == ".parquet":
            parquet = pq.ParquetFile(file)
            for row_group in range(parquet.num_row_groups):
                yield parquet.read_row_group(row_group, columns=[text_column]).column(text_column).to_pylist()
        else:
            # split after each run of blank lines, so the paragraph keeps its trailing newlines
            yield re.split(r"(?<=\n\n)(?!\n)", file.read_text(encoding="utf-8"))


class Progress:
    """Characters streamed so far, throughput and ETA, printed about once a second."""

    def __init__(self, max_chars: int):
        self.max_chars = max_chars
        self.chars = 0
        self.bytes = 0
        self.start = time.perf_counter()
        self.last_print = self.start
        self.line_end = "\r" if sys.stdout.isatty() else "\n"

    def update(self, text: str) -> None:
        self.chars += len(text)
        self.bytes += len(text.encode("utf-8"))
        now = time.perf_counter()
        if now - self.last_print >= 1.0:
            self.last_print = now
            print(self.line(now), end=self.line_end, flush=True)

    def line(self, now: float, done: bool = False) -> str:
        elapsed = max(now - self.start, 1e-9)
        chars_per_s = self.chars / elapsed
        eta = (self.max_chars - self.chars) / max(chars_per_s, 1e-9)
        return (f"streamed {self.chars / 1e6:,.1f}M / {self.max_chars / 1e6:,.1f}M chars "
                f"({100 * self.chars / self.max_chars:.1f}%) | {chars_per_s / 1e6:.2f}M chars/s | "
                f"{self.bytes / elapsed / 1e6:.2f} MB/s | " + (f"done in {elapsed:.1f}s" if done else f"eta {eta:.0f}s"))


def iter_training_text(batches: Iterator[list[str]], max_chars: int, doc_cap: int,
                       progress: Progress) -> Iterator[str]:
    for document in (document for batch in batches for document in batch):
        if not isinstance(document, str) or not document:
            continue  # null rows in parquet
        document = document[: min(doc_cap, max_chars - progress.chars)]
        progress.update(document)
        yield document
        if progress.chars >= max_chars:
            break
    # the trainer still has to count the last buffer and learn the merges, so the clock stops here
    print(progress.line(time.perf_counter(), done=True))


# -----------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.input is not None:
        names = ", ".join(str(path) for path in args.input[:3]) + (", ..." if len(args.input) > 3 else "")
        source = f"{len(args.input)} input file(s) ({names})"
        batches = iter_file_documents(args.input, args.text_column)
    else:
        data_dir = args.data or args.data_dir
        source = f"the train split of {data_dir or default_shard_dir()}"
        batches = iter_documents_batched("train", data_dir=data_dir)
    print(f"Training a {args.vocab_size}-token tokenizer on up to {args.max_chars:,} chars from {source} "
          f"(documents cropped to {args.doc_cap:,} chars)")

    progress = Progress(args.max_chars)
    start = time.perf_counter()
    tokenizer = Tokenizer.train_from_iterator(iter_training_text(batches, args.max_chars, args.doc_cap, progress),
                                              args.vocab_size)
    train_time = time.perf_counter() - start
    if progress.chars == 0:
        sys.exit("error: the input holds no text to train on")
    print(f"Trained in {train_time:.1f}s: vocab size {tokenizer.get_vocab_size()}, fingerprint {tokenizer.fingerprint()}")
    if tokenizer.get_vocab_size() < args.vocab_size:
        print(f"warning: the text ran out of pairs to merge, so the vocabulary has {tokenizer.get_vocab_size()} "
              f"tokens, not {args.vocab_size}; raise --max-chars or give more text for the full size")

    # a round trip through the saved files is the check that matters: it is what every later stage loads
    tokenizer_dir = get_base_dir() / "tokenizer"
    tokenizer.save(tokenizer_dir)
    sample = "Hello world! This is a test.\nNumbers: 123, 4567. Unicode: 你好, 안녕하세요, Grüße 🙂 <|bos|>"
    loaded = Tokenizer.from_directory(tokenizer_dir)
    assert loaded.decode(loaded.encode(sample)) == sample
    assert loaded.fingerprint() == tokenizer.fingerprint()

    token_bytes = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int64)
    atomic_torch_save(token_bytes, tokenizer_dir / TOKEN_BYTES_FILE)
    print(f"Saved the tokenizer and {TOKEN_BYTES_FILE} to {tokenizer_dir}")

    text_token_bytes = token_bytes[token_bytes > 0].float()
    get_report().log(TOKENIZER_TRAINING, [
        {"max_chars": args.max_chars, "doc_cap": args.doc_cap, "vocab_size": args.vocab_size, "source": source},
        {
            "train_time_s": round(train_time, 2),
            "chars_streamed": progress.chars,
            "bytes_streamed": progress.bytes,
            "vocab_size": tokenizer.get_vocab_size(),
            "num_special_tokens": len(SPECIAL_TOKENS),
            "fingerprint": tokenizer.fingerprint(),
            "token_bytes_min": int(text_token_bytes.min().item()),
            "token_bytes_max": int(text_token_bytes.max().item()),
            "token_bytes_mean": round(text_token_bytes.mean().item(), 3),
            "token_bytes_std": round(text_token_bytes.std().item(), 3),
        },
    ])


if __name__ == "__main__":
    main()
