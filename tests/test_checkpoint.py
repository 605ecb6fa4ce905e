"""Checkpoints: round trips, the latest complete step, and clear errors for corrupt or mismatched files."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from nanochat.checkpoint import (
    CheckpointError,
    build_model,
    find_largest_tag,
    find_last_step,
    load_checkpoint,
    load_model,
    meta_path,
    model_meta,
    model_path,
    optim_path,
    save_checkpoint,
)
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.tokenizer import Tokenizer


@pytest.fixture
def saved_tokenizer(tiny_tokenizer, base_dir):
    tiny_tokenizer.save(base_dir / "tokenizer")
    return tiny_tokenizer


def trained_model(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    model = GPT(model_config_from_depth(2, vocab_size=vocab_size, sequence_len=32))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def save_step(directory, model, tokenizer, step, **extra):
    meta = model_meta(model.config, tokenizer, step, **extra)
    optimizers = model.setup_optimizers()
    save_checkpoint(directory, step, model.state_dict(), [o.state_dict() for o in optimizers], meta)


def test_load_model_returns_the_saved_weights_tokenizer_and_meta(saved_tokenizer, base_dir):
    model = trained_model(saved_tokenizer.get_vocab_size())
    directory = base_dir / "base_checkpoints" / "d2"
    save_step(directory, model, saved_tokenizer, 5, loop_state={"smooth_train_loss": 1.5})
    loaded, tokenizer, meta = load_model("base", "cpu", "eval")
    assert not loaded.training and tokenizer.fingerprint() == saved_tokenizer.fingerprint()
    assert meta["step"] == 5 and meta["loop_state"] == {"smooth_train_loss": 1.5}
    assert meta["model_config"] == asdict(model.config)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    idx = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(loaded(idx), model.eval()(idx))
    assert load_model("base", "cpu", "train")[0].training


def test_optimizer_states_round_trip_per_rank(saved_tokenizer, tmp_path):
    model = trained_model(saved_tokenizer.get_vocab_size())
    meta = model_meta(model.config, saved_tokenizer, 3)
    save_checkpoint(tmp_path, 3, model.state_dict(), [{"rank": 0}], meta, rank=0)
    save_checkpoint(tmp_path, 3, None, [{"rank": 1}], meta, rank=1)
    for rank in (0, 1):
        _, optimizer_states, _ = load_checkpoint(tmp_path, 3, "cpu", load_optimizer=True, rank=rank)
        assert optimizer_states == [{"rank": rank}]
    with pytest.raises(CheckpointError, match="same number of processes"):
        load_checkpoint(tmp_path, 3, "cpu", load_optimizer=True, rank=2)


def test_last_step_is_the_largest_complete_one_and_largest_tag_the_deepest(saved_tokenizer, base_dir, tmp_path):
    model = trained_model(saved_tokenizer.get_vocab_size())
    for step in (10, 20):
        save_step(tmp_path, model, saved_tokenizer, step)
    torch.save(model.state_dict(), model_path(tmp_path, 30))  # a crash before step 30's meta: incomplete
    assert find_last_step(tmp_path) == 20
    for tag in ("d4", "d12", "d2"):
        (base_dir / "base_checkpoints" / tag).mkdir(parents=True)
    assert find_largest_tag(base_dir / "base_checkpoints") == "d12"
    with pytest.raises(CheckpointError, match="train one first"):
        find_last_step(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="scripts.mid_train"):
        load_model("mid", "cpu", "eval")


def test_a_truncated_model_file_names_the_file_and_the_fix(saved_tokenizer, base_dir):
    model = trained_model(saved_tokenizer.get_vocab_size())
    directory = base_dir / "base_checkpoints" / "d2"
    save_step(directory, model, saved_tokenizer, 7)
    path = model_path(directory, 7)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model_000007\.pt.*corrupt or truncated.*meta_000007\.json"):
        load_model("base", "cpu", "eval")


def test_a_missing_file_or_corrupt_meta_is_a_clear_error(saved_tokenizer, tmp_path):
    model = trained_model(saved_tokenizer.get_vocab_size())
    save_step(tmp_path, model, saved_tokenizer, 7)
    optim_path(tmp_path, 7, 0).unlink()
    with pytest.raises(CheckpointError, match=r"optim_000007_rank0\.pt.*missing"):
        load_checkpoint(tmp_path, 7, "cpu", load_optimizer=True)
    meta_path(tmp_path, 7).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"meta_000007\.json is corrupt"):
        load_checkpoint(tmp_path, 7, "cpu")


def test_weights_that_do_not_fit_the_meta_config_are_rejected(saved_tokenizer, base_dir):
    model = trained_model(saved_tokenizer.get_vocab_size())
    directory = base_dir / "base_checkpoints" / "d2"
    save_step(directory, model, saved_tokenizer, 7)
    meta = json.loads(meta_path(directory, 7).read_text())
    meta["model_config"]["n_layer"] = 3  # e.g. a meta file copied from another run
    meta_path(directory, 7).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match the model config"):
        load_model("base", "cpu", "eval")


def test_a_different_tokenizer_is_rejected_with_the_fix(saved_tokenizer, base_dir, mirror_texts):
    model = trained_model(saved_tokenizer.get_vocab_size())
    save_step(base_dir / "base_checkpoints" / "d2", model, saved_tokenizer, 7)
    other = Tokenizer.train_from_iterator((text[:2000] for text in mirror_texts[200:300]), vocab_size=400)
    other.save(base_dir / "tokenizer")
    with pytest.raises(CheckpointError, match="trained with tokenizer .* restore the tokenizer"):
        load_model("base", "cpu", "eval")


def test_build_model_accepts_compiled_state_names_and_inits_fresh_models():
    model = trained_model(300)
    meta = {"model_config": asdict(model.config)}
    compiled_state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    rebuilt = build_model(meta, "cpu", "eval", compiled_state)
    assert torch.equal(rebuilt.lm_head.weight, model.lm_head.weight)
    fresh = build_model(meta, "cpu", "train")
    assert fresh.training and (fresh.transformer.h[0].mlp.c_proj.weight == 0).all()  # init_weights ran
    with pytest.raises(ValueError, match="phase"):
        build_model(meta, "cpu", "inference")
