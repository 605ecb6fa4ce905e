"""The tokenizer stages: scripts.tok_train and scripts.tok_eval, run the way a user runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.tokenizer import TOKEN_BYTES_FILE, Tokenizer, get_token_bytes, get_tokenizer
from scripts import tok_eval, tok_train

REPO_ROOT = Path(__file__).resolve().parents[1]


def report_section(base_dir: Path, slug: str) -> dict:
    return json.loads((base_dir / "report" / f"{slug}.json").read_text())


def test_tok_train_end_to_end_on_the_mirror(base_dir):
    result = subprocess.run(
        [sys.executable, "-m", "scripts.tok_train", "--max-chars", "3e5", "--vocab-size", "512"],
        cwd=REPO_ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"streamed 0\.3M / 0\.3M chars \(100\.0%\) \| [\d.]+M chars/s \| [\d.]+ MB/s \| done in",
                     result.stdout)

    tokenizer = get_tokenizer()
    assert tokenizer.get_vocab_size() == 512
    token_bytes = get_token_bytes()
    assert token_bytes.tolist() == tokenizer.token_byte_lengths()
    section = report_section(base_dir, "tokenizer-training")
    assert section["section"] == "Tokenizer training"
    assert section["data"][1]["fingerprint"] == tokenizer.fingerprint()
    assert section["data"][1]["chars_streamed"] == 300_000


def test_tok_train_reads_parquet_and_txt_inputs(base_dir, tmp_path, mirror_texts, capsys):
    pq.write_table(pa.table({"body": mirror_texts[:100]}), tmp_path / "docs.parquet")
    (tmp_path / "notes.txt").write_text("\n\n".join(mirror_texts[100:150]), encoding="utf-8")
    tok_train.main(["--input", str(tmp_path), "--text-column", "body", "--vocab-size", "300", "--max-chars", "1e9"])
    expected_chars = sum(min(len(t), 10_000) for t in mirror_texts[:100])
    section = report_section(base_dir, "tokenizer-training")
    # the .txt adds its paragraphs after the parquet's documents
    assert section["data"][1]["chars_streamed"] > expected_chars
    assert "2 input file(s)" in capsys.readouterr().out
    assert Tokenizer.from_directory(base_dir / "tokenizer").get_vocab_size() == 300
    assert torch.load(base_dir / "tokenizer" / TOKEN_BYTES_FILE).shape == (300,)


def test_tok_train_crops_documents_to_doc_cap(base_dir):
    tok_train.main(["--max-chars", "1e4", "--doc-cap", "100", "--vocab-size", "270"])
    section = report_section(base_dir, "tokenizer-training")
    assert section["data"][1]["chars_streamed"] == 10_000
    assert section["data"][0]["doc_cap"] == 100


def test_iter_training_text_stops_at_max_chars_and_caps_documents():
    progress = tok_train.Progress(max_chars=25)
    batches = iter([["a" * 20, None, "b" * 5], ["c" * 30]])
    assert list(tok_train.iter_training_text(batches, max_chars=25, doc_cap=12, progress=progress)) == [
        "a" * 12, "b" * 5, "c" * 8]
    assert progress.chars == 25


@pytest.mark.parametrize("argv, message", [
    (["--vocab-size", "100"], "--vocab-size 100 is too small: it must be at least 265"),
    (["--max-chars", "0"], "--max-chars must be positive"),
    (["--max-chars", "lots"], "expected a number like 2e9"),
    (["--doc-cap", "-5"], "--doc-cap must be positive"),
    (["--input", "/no/such/file.txt"], "--input path /no/such/file.txt does not exist"),
    (["--input", "tests/conftest.py"], "neither .parquet nor .txt"),
    (["--input", "../shared/data/fineweb/shard_00000.parquet", "--text-column", "body"],
     "has no 'body' column"),
    (["--data-dir", "tests"], "need at least 2 pretraining shards"),
    (["--data-dir", "/no/such/dir"], "is not a directory"),
])
def test_tok_train_rejects_bad_flags_with_a_clear_message(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(SystemExit) as exit_info:
        tok_train.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_tok_eval_prints_bytes_per_token_for_every_genre(tiny_tokenizer, base_dir, capsys):
    tiny_tokenizer.save(base_dir / "tokenizer")
    tok_eval.main([])
    out = capsys.readouterr().out
    ratios = {}
    for genre in [*tok_eval.GENRES, "shards-train", "shards-val"]:
        row = re.search(rf"^\| {genre} \| (\d+) \| (\d+) \| ([\d.]+) \|", out, re.MULTILINE)
        assert row, f"no row for {genre} in:\n{out}"
        num_bytes, num_tokens, ratio = int(row[1]), int(row[2]), float(row[3])
        assert ratio == pytest.approx(num_bytes / num_tokens, abs=0.01)
        ratios[genre] = ratio
    # trained on English technical prose, 247 merges compress English well and Chinese (3 bytes a char) hardly
    assert ratios["shards-val"] > 1.5
    assert ratios["chinese"] < 1.2 < ratios["prose"]
    compared = "| GPT-2 (50257) | cl100k (100277) |" in out
    assert compared or "comparison skipped" in out
    section = report_section(base_dir, "tokenizer-evaluation")
    assert section["data"][0]["fingerprint"] == tiny_tokenizer.fingerprint()
    assert "| prose |" in section["data"][1]


def test_tok_eval_without_a_tokenizer_says_how_to_train_one(base_dir):
    with pytest.raises(SystemExit, match="scripts.tok_train"):
        tok_eval.main([])


def test_tok_eval_compares_with_the_reference_encodings_it_can_load(tiny_tokenizer, base_dir, capsys, monkeypatch):
    # stands in for tiktoken's download: "gpt2" loads (here: our own ranks), "cl100k_base" has no network
    def get_encoding(name):
        if name == "gpt2":
            return tiny_tokenizer.enc
        raise OSError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tok_eval.tiktoken, "get_encoding", get_encoding)
    tiny_tokenizer.save(base_dir / "tokenizer")
    tok_eval.main([])
    out = capsys.readouterr().out
    assert "cl100k encoding could not be loaded (no network and no TIKTOKEN_CACHE_DIR copy); comparison skipped" in out
    assert "| genre | bytes | tokens | ours (512) | GPT-2 (512) |" in out
    prose = re.search(r"^\| prose \| \d+ \| \d+ \| ([\d.]+) \| ([\d.]+) \|$", out, re.MULTILINE)
    assert prose and prose[1] == prose[2]  # the same ranks compress the same
    assert report_section(base_dir, "tokenizer-evaluation")["data"][0]["compared_with"] == ["GPT-2"]
