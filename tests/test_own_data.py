"""Pretraining on your own text (`--data`, nanochat/own_data.py): jsonl and txt convert once into shards the loader
reads, a shard directory is used in place, --val-data names the validation split, bad input fails naming the file
(and line), the loader resumes exactly over own data, and base_train and tok_train train on it."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import own_data
from nanochat.checkpoint import meta_path
from nanochat.dataloader import DistributedTokenLoader
from nanochat.dataset import list_shards
from nanochat.own_data import prepare_own_data
from scripts import base_train, tok_train
from tasks.common import MalformedDataError
from tests.test_base_train import REPO, save_tokenizer

# depth 2, one micro-step of 2 x 64 tokens per step, 3 steps
FLAGS = ["--depth=2", "--max-seq-len=64", "--device-batch-size=2", "--total-batch-size=128", "--num-iterations=3",
         "--eval-every=-1", "--eval-tokens=128", "--sample-every=-1", "--save-every=-1"]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return path


def shard_texts(path: Path) -> list[str]:
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


@pytest.fixture
def jsonl_dir(tmp_path, mirror_texts) -> Path:
    directory = tmp_path / "my corpus"
    directory.mkdir()
    write_jsonl(directory / "a.jsonl", mirror_texts[:100])
    write_jsonl(directory / "b.jsonl", mirror_texts[100:150])
    write_jsonl(directory / "c.jsonl", mirror_texts[150:170])
    return directory


# -----------------------------------------------------------------------------
# Conversion


def test_jsonl_converts_once_into_train_shards_and_the_last_file_as_validation(jsonl_dir, base_dir, mirror_texts):
    directory = prepare_own_data(jsonl_dir)
    assert directory.parent == base_dir / "own_data" and directory.name.startswith("my_corpus-")
    shards = list_shards(directory)
    assert [shard.name for shard in shards] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert shard_texts(shards[0]) == mirror_texts[:150] and shard_texts(shards[1]) == mirror_texts[150:170]
    assert [p.name for p in (base_dir / "own_data").iterdir()] == [directory.name]  # no temporary left

    written = shards[0].stat().st_mtime_ns
    assert prepare_own_data(jsonl_dir, log=pytest.fail) == directory  # cached: not converted again
    assert shards[0].stat().st_mtime_ns == written
    write_jsonl(jsonl_dir / "c.jsonl", mirror_texts[150:160])
    assert prepare_own_data(jsonl_dir) != directory  # other text, another cache


def test_txt_files_are_one_document_each(tmp_path, base_dir):
    for name, text in (("1.txt", "first\n\nstill first"), ("2.txt", "second"), ("3.txt", "held out")):
        (tmp_path / name).write_text(text, encoding="utf-8")
    train, val = list_shards(prepare_own_data(tmp_path))
    assert shard_texts(train) == ["first\n\nstill first", "second"] and shard_texts(val) == ["held out"]


def test_a_parquet_shard_directory_is_used_in_place(base_dir):
    fineweb = REPO.parent / "shared" / "data" / "fineweb"
    assert prepare_own_data(fineweb) == fineweb
    assert not (base_dir / "own_data").exists()


def test_val_data_makes_all_of_data_train(jsonl_dir, tmp_path, base_dir, mirror_texts):
    val = write_jsonl(tmp_path / "held_out.jsonl", mirror_texts[200:210])
    train, val_shard = list_shards(prepare_own_data(jsonl_dir, val))
    assert shard_texts(train) == mirror_texts[:170] and shard_texts(val_shard) == mirror_texts[200:210]
    one_file = write_jsonl(tmp_path / "one.jsonl", mirror_texts[:10])
    assert len(list_shards(prepare_own_data(one_file, val))) == 2  # one file is enough with --val-data


@pytest.mark.parametrize(("files", "message"), [
    ({"a.jsonl": '{"text": "ok"}\n\n[1, 2]\n', "b.jsonl": '{"text": "ok"}\n'},
     r"a\.jsonl:3: expected an object with a string \"text\", got \[1, 2\]"),
    ({"a.jsonl": '{"text": "ok"}\n', "b.jsonl": '{"text": 5}\n'}, r"b\.jsonl:1: expected an object with a string"),
    ({"a.jsonl": '{"text": "ok"}\n', "b.jsonl": '{"text": "ok"\n'}, r"b\.jsonl:1: not valid JSON"),
    ({"a.jsonl": '{"text": "ok"}\n', "b.jsonl": "\n"}, r"b\.jsonl holds no text"),
    ({"a.parquet": pa.table({"body": ["x"]}), "b.parquet": pa.table({"body": ["y"]})},
     r"a\.parquet has no 'text' column .*name the column of documents 'text'"),
    ({"shard_00000.parquet": pa.table({"text": ["x"]}), "shard_00001.parquet": pa.table({"body": ["y"]})},
     r"shard_00001\.parquet has no 'text' column"),
    ({"a.txt": "x", "b.jsonl": '{"text": "y"}\n'}, r"holds \.jsonl and \.txt files: keep one kind per directory"),
    ({"only.txt": "x"}, r"holds 1 file: .*give a directory of at least 2 files, or .*--val-data VAL"),
    ({"notes.md": "x"}, r"holds no \.parquet, \.jsonl, \.txt files"),
])
def test_bad_input_fails_naming_the_file_and_line(tmp_path, base_dir, files, message):
    for name, content in files.items():
        if isinstance(content, pa.Table):
            pq.write_table(content, tmp_path / name)
        else:
            (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(MalformedDataError, match=message):
        prepare_own_data(tmp_path)
    assert not list((base_dir / "own_data").glob("*"))  # no cache, not even half of one


def test_a_missing_path_fails_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data .*nowhere does not exist"):
        prepare_own_data(tmp_path / "nowhere")


# -----------------------------------------------------------------------------
# Loading and training


def test_the_loader_resumed_from_a_saved_state_yields_the_uninterrupted_batches(tmp_path, base_dir, monkeypatch,
                                                                                  tiny_tokenizer, mirror_texts):
    # small shards and row groups, so that the batches cross row groups, shards and epochs
    monkeypatch.setattr(own_data, "ROW_GROUP_DOCS", 3)
    monkeypatch.setattr(own_data, "SHARD_CHARS", 10_000)
    write_jsonl(tmp_path / "a.jsonl", [text[:2000] for text in mirror_texts[:20]])
    write_jsonl(tmp_path / "b.jsonl", mirror_texts[20:22])
    directory = prepare_own_data(tmp_path)
    assert len(list_shards(directory)) > 3

    def loader(state=None):
        return DistributedTokenLoader(tiny_tokenizer, 2, 64, "train", resume_state=state, data_dir=directory,
                                      rank=0, world_size=1)

    uninterrupted = loader()
    for _ in range(7):
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.state_dict()))  # as a checkpoint stores it
    expected = [next(uninterrupted) for _ in range(200)]  # past the end of the data: into the next epochs
    resumed = loader(state)
    for (inputs, targets), (resumed_inputs, resumed_targets) in zip(expected, itertools.islice(resumed, 200),
                                                                    strict=True):
        assert inputs.equal(resumed_inputs) and targets.equal(resumed_targets)
    assert state["offset"] > 0 and resumed.state_dict()["epoch"] >= 1
    uninterrupted.close()
    resumed.close()


def test_base_train_trains_on_jsonl_and_refuses_a_resume_with_other_data(jsonl_dir, tmp_path, base_dir,
                                                                          tiny_tokenizer, mirror_texts, capsys):
    save_tokenizer(tiny_tokenizer, base_dir)
    assert base_train.main([*FLAGS, "--data", str(jsonl_dir)]) == 0
    assert "val bpb" in capsys.readouterr().out
    meta = json.loads(meta_path(base_dir / "base_checkpoints" / "d2", 3).read_text())
    assert meta["user_config"]["data"] == str(jsonl_dir.resolve()) and meta["user_config"]["val_data"] is None

    other = write_jsonl(tmp_path / "other.jsonl", mirror_texts[:10])
    with pytest.raises(SystemExit, match=r"--val-data: saved None, now '.*other\.jsonl'.*pass the original flags"):
        base_train.main([*FLAGS, "--data", str(jsonl_dir), "--val-data", str(other), "--resume"])


def test_base_train_trains_on_txt_with_val_data(tmp_path, base_dir, tiny_tokenizer, mirror_texts, capsys):
    save_tokenizer(tiny_tokenizer, base_dir)
    train_dir = tmp_path / "books"
    train_dir.mkdir()
    (train_dir / "book.txt").write_text("\n".join(mirror_texts[:60]), encoding="utf-8")
    (tmp_path / "held_out.txt").write_text("\n".join(mirror_texts[60:70]), encoding="utf-8")
    assert base_train.main([*FLAGS, "--data", str(train_dir), "--val-data", str(tmp_path / "held_out.txt")]) == 0
    assert "step 00003/00003" in capsys.readouterr().out


def test_base_train_on_bad_data_exits_with_one_line_naming_file_and_line(tmp_path, base_dir):
    write_jsonl(tmp_path / "a.jsonl", ["fine"])
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n', encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "scripts.base_train", *FLAGS, "--data", str(tmp_path)], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'b.jsonl'}:2: expected an object")


def test_tok_train_data_trains_on_the_train_split_of_that_text(jsonl_dir, base_dir, mirror_texts, capsys):
    tok_train.main(["--data", str(jsonl_dir), "--vocab-size", "300", "--max-chars", "1e9"])
    section = json.loads((base_dir / "report" / "tokenizer-training.json").read_text())
    assert section["data"][1]["chars_streamed"] == sum(min(len(text), 10_000) for text in mirror_texts[:150])
    assert str(base_dir / "own_data") in capsys.readouterr().out


def test_tok_train_data_with_bad_input_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "only.jsonl").write_text('{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(SystemExit):
        tok_train.main(["--data", str(tmp_path)])
    assert "holds 1 file" in capsys.readouterr().err
