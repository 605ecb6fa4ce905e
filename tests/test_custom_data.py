"""Your own conversations (`--conversations FILE.jsonl[:WEIGHT]`, `--mix default|none`): good files train, alone or
beside the built-in mixture; every kind of bad line is refused before anything runs, naming the file and the line,
with no traceback and no checkpoint written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from report import Report
from scripts import chat_sft
from tasks.common import MalformedDataError
from tasks.custom import CustomConversations, conversation_file
from tests.test_mid_sft_rl import REPO_ROOT, use_dirs, write_base_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SFT = ["--source=base", "--device-type=cpu", "--max-seq-len=64", "--device-batch-size=2", "--examples-per-step=2",
       "--num-iterations=2", "--eval-every=-1", "--eval-steps=1", "--eval-metrics-every=-1",
       "--eval-metrics-max-problems=2"]

GOOD = [
    {"messages": [{"role": "user", "content": "What is the capital of Peru?"},
                  {"role": "assistant", "content": "Lima."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7 * 6?"},
                  {"role": "assistant", "content": [{"type": "python", "text": "7 * 6"},
                                                    {"type": "python_output", "text": "42"},
                                                    {"type": "text", "text": "42."}]}]},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_a_conversation_file_alone_is_what_sft_trains_on(tiny_tokenizer, monkeypatch, tmp_path):
    use_dirs(monkeypatch, tmp_path)
    write_base_checkpoint(tmp_path, tiny_tokenizer)
    mine = write_jsonl(tmp_path / "mine.jsonl", GOOD)
    result = chat_sft.main([*SFT, f"--conversations={mine}:3", "--mix=none"])
    assert result["stats"].conversations == 2 * 2  # two steps of two rows, all drawn from the file
    section = Report(tmp_path / "report").read_sections()["Chat SFT"]
    assert section["data"][1]["training mixture"] == {"mine.jsonl x3": 6, "total": 6}


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not valid JSON"),
    ('["a", "list"]', "a conversation is"),
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "'user' was expected"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "alternate"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant message"),
    ({"messages": [{"role": "user", "content": "a"},
                   {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}, "image"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]}, "empty content"),
])
def test_each_kind_of_bad_line_is_refused_with_its_line_number(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], "", line])
    with pytest.raises(MalformedDataError, match=rf"bad\.jsonl:3: .*{message}"):
        CustomConversations(path)


def test_a_bad_file_stops_the_run_before_anything_is_written(tiny_tokenizer, monkeypatch, tmp_path):
    use_dirs(monkeypatch, tmp_path)
    write_base_checkpoint(tmp_path, tiny_tokenizer)
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], {"messages": [{"role": "user", "content": "x"}]}])
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path), "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "scripts.chat_sft", *SFT, f"--conversations={bad}", "--mix=none"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {bad}:2: no assistant message, so nothing to learn " \
                                                     "from; add the reply"
    assert not (tmp_path / "chatsft_checkpoints").exists()


def test_flags_name_their_fix(capsys):
    assert conversation_file("a.jsonl") == ("a.jsonl", 1) and conversation_file("dir/a.jsonl:4") == ("dir/a.jsonl", 4)
    for bad in (["--conversations=a.jsonl:0"], ["--conversations=a.jsonl:x"], ["--mix=none"]):
        with pytest.raises(SystemExit):
            chat_sft.parse_args(bad)
    assert "at least one --conversations" in capsys.readouterr().err


def test_the_models_identity_comes_from_a_file(tmp_path, capsys):
    from tasks.identity import DEFAULT_IDENTITY, IdentityConversations

    templates = json.loads(DEFAULT_IDENTITY.read_text())
    templates["introductions"] = ["I am Zed, an assistant made by Acme Labs."]
    mine = tmp_path / "identity.json"
    mine.write_text(json.dumps(templates))
    replies = [IdentityConversations(size=20, identity=mine)[i]["messages"][1]["content"] for i in range(20)]
    assert all(reply.startswith("I am Zed, an assistant made by Acme Labs.") for reply in replies)
    assert chat_sft.parse_args([f"--identity={mine}"]).identity == str(mine)
    del templates["questions"]
    mine.write_text(json.dumps(templates))
    with pytest.raises(SystemExit):
        chat_sft.parse_args([f"--identity={mine}"])
    assert "'questions' must be a non-empty list" in capsys.readouterr().err
