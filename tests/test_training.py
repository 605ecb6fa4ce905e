"""nanochat/training.py, the loop every stage shares: the schedules, pruning old checkpoints, the last step saved before
its final evaluation, CORE not run on the untrained model, earlier runs set aside and resumes checked in the chat
stages too, and boundary errors as one-line exit messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import training
from nanochat.checkpoint import complete_steps, find_last_step
from report import Report
from scripts import base_train, mid_train

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--depth=2", "--max-seq-len=64", "--device-batch-size=2", "--total-batch-size=128", "--num-iterations=6",
         "--eval-every=-1", "--eval-tokens=128", "--sample-every=-1"]

pytestmark = pytest.mark.usefixtures("one_thread")


def save_tokenizer(tokenizer, base_dir: Path) -> None:
    tokenizer.save(base_dir / "tokenizer")
    torch.save(torch.tensor(tokenizer.token_byte_lengths()), base_dir / "tokenizer" / "token_bytes.pt")


def test_one_schedule_serves_every_stage():
    lrm = training.lr_multiplier
    assert [lrm(s, 10, warmdown_ratio=1.0) for s in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])  # SFT and RL
    assert lrm(0.5, 1.0, warmdown_ratio=0.2) == 1.0  # midtraining's progress in passes over the data
    assert lrm(0.9, 1.0, warmdown_ratio=0.2) == pytest.approx(0.5)
    assert lrm(1.3, 1.0, warmdown_ratio=0.2) == 0.0  # past the end of the data: never negative
    assert lrm(7, 8, warmdown_ratio=0.0) == 1.0
    momentum = [training.muon_momentum(s) for s in (0, 150, 300, 600)]
    assert momentum == pytest.approx([0.85, 0.9, 0.95, 0.95])


def test_schedule_sets_every_groups_lr_and_muons_momentum():
    from nanochat.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    optimizers = model.setup_optimizers()
    training.apply_schedule(optimizers, 0.5, step=150)
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(0.5 * group["initial_lr"])
    assert all(group["momentum"] == pytest.approx(0.9) for group in optimizers[1].param_groups)


def test_momentum_warmdown_brings_muons_momentum_back_down_across_the_lr_warmdown():
    left = [training.warmdown_remaining(s, 1000, warmdown_ratio=0.2) for s in (0, 800, 900, 1000)]
    assert left == pytest.approx([1.0, 1.0, 0.5, 0.0])
    assert [training.muon_momentum(s, w) for s, w in zip((0, 800, 900, 1000), left)] == pytest.approx(
        [0.85, 0.95, 0.9, 0.85])
    assert training.muon_momentum(150, 0.5) == pytest.approx(0.875)  # during warmup too, from where it is
    args = base_train.parse_args([*FLAGS, "--warmdown-ratio=0.2"])
    assert training.momentum_warmdown_left(args, 900, 1000) == 1.0  # off by default
    args = base_train.parse_args([*FLAGS, "--warmdown-ratio=0.2", "--momentum-warmdown"])
    assert training.momentum_warmdown_left(args, 900, 1000) == pytest.approx(0.5)


def test_schedule_applies_the_momentum_warmdown_to_muon_only():
    from nanochat.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    adamw, muon = model.setup_optimizers()
    training.apply_schedule([adamw, muon], 0.5, step=600, warmdown_left=0.5)
    assert all(group["momentum"] == pytest.approx(0.9) for group in muon.param_groups)
    assert all("momentum" not in group for group in adamw.param_groups)


def test_optimizer_variant_flags_are_off_by_default_and_build_muons_options():
    from nanochat.gpt import GPT, GPTConfig

    defaults = mid_train.parse_args([])
    assert training.muon_options(defaults) == {"ns_coefficients": "quintic", "normuon": False, "normuon_beta2": 0.95,
                                               "weight_decay": 0.0, "cautious_weight_decay": True}
    args = mid_train.parse_args(["--muon-ns=polar_express", "--normuon=0.9", "--muon-weight-decay=0.1",
                                 "--no-muon-cautious-weight-decay", "--embedding-betas=0.7,0.99"])
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    adamw, muon = training.setup_optimizers(model, args)
    assert {key: muon.param_groups[0][key] for key in training.muon_options(defaults)} == {
        "ns_coefficients": "polar_express", "normuon": True, "normuon_beta2": 0.9, "weight_decay": 0.1,
        "cautious_weight_decay": False}
    lm_head, embeddings = adamw.param_groups[:2]
    assert embeddings["betas"] == (0.7, 0.99) and lm_head["betas"] == (0.8, 0.95)
    assert mid_train.parse_args(["--normuon"]).normuon == 0.95


@pytest.mark.parametrize("flag", ["--normuon=1.5", "--muon-weight-decay=-0.1", "--muon-ns=cubic",
                                  "--embedding-betas=0.9", "--embedding-betas=0.9,x"])
def test_a_bad_optimizer_variant_flag_is_a_parser_error(flag, capsys):
    with pytest.raises(SystemExit):
        base_train.parse_args([*FLAGS, flag])
    assert flag.split("=")[0] in capsys.readouterr().err


def test_only_pretraining_takes_the_momentum_warmdown():
    with pytest.raises(SystemExit):
        mid_train.parse_args(["--momentum-warmdown"])


def test_a_resume_with_other_optimizer_variants_is_refused(base_dir, tiny_tokenizer):
    save_tokenizer(tiny_tokenizer, base_dir)
    variants = ["--muon-ns=polar_express", "--normuon", "--muon-weight-decay=0.1", "--momentum-warmdown",
                "--warmdown-ratio=0.5", "--embedding-betas=0.7,0.99"]
    assert base_train.main([*FLAGS, *variants, "--save-every=3"]) == 0
    (base_dir / "base_checkpoints" / "d2" / "meta_000006.json").unlink()  # resume from step 3
    with pytest.raises(SystemExit, match=r"--normuon: saved 0.95, now None"):
        base_train.main([*FLAGS, *[v for v in variants if v != "--normuon"], "--resume"])
    assert base_train.main([*FLAGS, *variants, "--resume"]) == 0


def test_keep_checkpoints_prunes_all_but_the_newest(base_dir, tiny_tokenizer):
    save_tokenizer(tiny_tokenizer, base_dir)
    assert base_train.main([*FLAGS, "--save-every=1", "--keep-checkpoints=2"]) == 0
    directory = base_dir / "base_checkpoints" / "d2"
    assert complete_steps(directory) == [5, 6]
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        f"{kind}_{step:06d}{suffix}" for step in (5, 6)
        for kind, suffix in (("model", ".pt"), ("meta", ".json"), ("optim", "_rank0.pt")))


def test_the_last_step_is_saved_before_a_final_evaluation_that_crashes(base_dir, tiny_tokenizer, monkeypatch):
    save_tokenizer(tiny_tokenizer, base_dir)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(base_train, "evaluate_bpb", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        base_train.main(FLAGS)
    assert find_last_step(base_dir / "base_checkpoints" / "d2") == 6  # six steps of training are on disk


def test_core_is_not_evaluated_on_the_untrained_model_unless_asked(base_dir, tiny_tokenizer, monkeypatch):
    save_tokenizer(tiny_tokenizer, base_dir)
    calls = []

    class Result:
        core = 0.0

    def fake_core(model, tokenizer, device, bundle, **kwargs):
        calls.append(Path(bundle).name)
        return Result()

    import nanochat.core_eval

    monkeypatch.setattr(nanochat.core_eval, "evaluate_core", fake_core)
    assert base_train.main([*FLAGS, "--core-metric-every=3"]) == 0
    steps = [row["step"] for row in Report(base_dir / "report").read_metrics()["base_train"] if "core_metric" in row]
    assert steps == [3, 6] and calls == ["eval_bundle", "eval_bundle"]
    assert base_train.main([*FLAGS, "--core-metric-every=3", "--core-metric-at-start"]) == 0
    steps = [row["step"] for row in Report(base_dir / "report").read_metrics()["base_train"] if "core_metric" in row]
    assert steps[-3:] == [0, 3, 6]


def write_base_checkpoint(base_dir: Path, tokenizer) -> None:
    from tests.test_mid_sft_rl import write_base_checkpoint as write

    write(base_dir, tokenizer)


MID = ["--device-type=cpu", "--max-seq-len=64", "--device-batch-size=2", "--num-iterations=2", "--eval-every=-1",
       "--eval-tokens=128"]


def test_a_chat_stage_sets_an_earlier_run_aside_and_checks_a_resume(tiny_tokenizer, monkeypatch, tmp_path):
    from tests.test_mid_sft_rl import use_dirs

    use_dirs(monkeypatch, tmp_path)
    write_base_checkpoint(tmp_path, tiny_tokenizer)
    mid_train.main(MID)
    mid_train.main(MID)  # a second fresh run: the first one's checkpoints move aside, nothing is mixed
    aside = list((tmp_path / "mid_checkpoints").glob("d2.replaced-*"))
    assert len(aside) == 1 and complete_steps(aside[0]) == [2]
    with pytest.raises(training.RunError, match=r"--matrix-lr: saved 0.02, now 0.05.*pass the original flags"):
        mid_train.main([*MID, "--resume", "--matrix-lr=0.05"])


def test_a_boundary_error_exits_with_one_line_that_names_the_fix(tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "scripts.mid_train", "--device-type=cpu"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: no base checkpoint in ")
    assert "Traceback" not in result.stderr and "run python -m scripts.base_train first" in result.stderr


def test_flags_after_torchruns_separator_are_the_scripts_own():
    args = mid_train.parse_args(["--", "--max-seq-len=32", "--keep-checkpoints=3"])
    assert args.max_seq_len == 32 and args.keep_checkpoints == 3
    with pytest.raises(SystemExit):
        mid_train.parse_args(["--keep-checkpoints=0"])


def test_a_run_saved_before_a_flag_existed_resumes_with_the_value_it_ran_with(base_dir, tiny_tokenizer, capsys):
    import json

    save_tokenizer(tiny_tokenizer, base_dir)
    assert base_train.main(FLAGS) == 0
    meta_file = base_dir / "base_checkpoints" / "d2" / "meta_000006.json"
    meta = json.loads(meta_file.read_text())
    for newer in ("seed", "rope_base", "data", "val_data"):  # as an older version wrote it
        del meta["user_config"][newer]
    meta_file.write_text(json.dumps(meta))
    assert base_train.main([*FLAGS, "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--rope-base: saved 10000.0, now 100000.0"):
        base_train.main([*FLAGS, "--resume", "--rope-base=100000"])
