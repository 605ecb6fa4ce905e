"""LoRA finetuning (chat_sft --lora-rank): only the adapters train; a LoRA checkpoint holds the adapters and names
its base; every loader folds them in transparently, and --merge writes the folded model as a full checkpoint; a
resumed LoRA run repeats the uninterrupted one; a changed base and bad flags are refused with the fix."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch

from nanochat import lora
from nanochat.checkpoint import CheckpointError, load_model, save_checkpoint
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.tokenizer import Tokenizer
from nanochat.training import RunError
from scripts import chat_cli, chat_sft
from tests.conftest import randomized

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
TAG = "d2"
LORA_ARGS = ["--source=base", "--device-type=cpu", "--max-seq-len=64", "--device-batch-size=2",
             "--examples-per-step=2", "--num-iterations=4", "--eval-every=2", "--eval-steps=1",
             "--eval-metrics-every=-1", "--eval-metrics-max-problems=4", "--save-every=2", "--lora-rank=8",
             "--lora-alpha=16"]

pytestmark = pytest.mark.usefixtures("one_thread")


def use_dirs(monkeypatch, base_dir: Path) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(DATA_DIR))


def write_base_checkpoint(base_dir: Path, tokenizer: Tokenizer, seed: int = 0) -> None:
    """A tiny random base checkpoint whose every weight is random (no zero-init identity blocks, an LM head giving
    logits of size ~1) so that the adapters' effect shows in the logits; the special tokens' logits are pinned at 0,
    below the best of ~500 random ones, so greedy replies run to their token limit."""
    tokenizer.save(base_dir / "tokenizer")
    config = model_config_from_depth(2, tokenizer.get_vocab_size(), sequence_len=64)
    torch.manual_seed(seed)
    model = randomized(GPT(config), head_std=0.05)
    with torch.no_grad():
        model.lm_head.weight[[tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()]] = 0.0
    meta = {"model_config": asdict(config), "tokenizer_fingerprint": tokenizer.fingerprint(), "step": 0}
    save_checkpoint(base_dir / "base_checkpoints" / TAG, 0, model.state_dict(), None, meta)


def sft_dir(base_dir: Path, tag: str = TAG) -> Path:
    return base_dir / "chatsft_checkpoints" / tag


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to 1e-5: W x + B (A x) and (W + B A) x round differently in fp32, by ~1e-6 at logits of size ~1 (with
    logits near the softcap, 15, the same model differs from its own fp64 form by 1.4e-5)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@dataclass
class LoRARun:
    base_dir: Path
    result: dict
    model: torch.nn.Module  # the adapter model as training left it
    optimizers: list


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_tokenizer) -> LoRARun:
    """chat_sft --lora-rank 8 on a tiny base model, 4 steps, checkpoints at steps 2 and 4."""
    base_dir = tmp_path_factory.mktemp("lora")
    captured = {}

    def capture_optimizers(model, *args, **kwargs):
        captured["model"], captured["optimizers"] = model, real_setup_optimizers(model, *args, **kwargs)
        return captured["optimizers"]

    real_setup_optimizers = lora.setup_optimizers
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_dirs(monkeypatch, base_dir)
        write_base_checkpoint(base_dir, tiny_tokenizer)
        monkeypatch.setattr(lora, "setup_optimizers", capture_optimizers)
        result = chat_sft.main(LORA_ARGS)
    return LoRARun(base_dir, result, captured["model"], captured["optimizers"])


@pytest.fixture
def in_run_dir(lora_run, monkeypatch, tmp_path) -> Path:
    """A copy of the LoRA run's base dir, used for this test."""
    base_dir = tmp_path / "base"
    shutil.copytree(lora_run.base_dir, base_dir)
    use_dirs(monkeypatch, base_dir)
    return base_dir


# -----------------------------------------------------------------------------
# The adapter layer


def test_step_zero_is_the_base_model_and_only_the_targets_get_adapters(tiny_gpt):
    model = lora.apply_lora(copy.deepcopy(tiny_gpt), lora.LoRASettings(4, 4.0, ("attn",)))
    tokens = torch.randint(0, tiny_gpt.config.vocab_size, (2, 16))
    assert torch.equal(logits(model, tokens), logits(tiny_gpt, tokens))  # B starts at zero
    block = model.transformer.h[0]
    assert all(isinstance(getattr(block.attn, name), lora.LoRALinear) for name in ("c_q", "c_k", "c_v", "c_proj"))
    assert not isinstance(block.mlp.c_fc, lora.LoRALinear) and not isinstance(block.mlp.c_proj, lora.LoRALinear)
    assert [p.shape for p in (block.attn.c_q.lora_A.weight, block.attn.c_q.lora_B.weight)] == [(4, 64), (64, 4)]


def test_trainable_parameters_are_under_ten_percent_at_rank_8(tiny_tokenizer):
    model = GPT(model_config_from_depth(2, tiny_tokenizer.get_vocab_size(), sequence_len=64))
    total_before = model.num_params()
    lora.apply_lora(model, lora.LoRASettings(8, 8.0, ("attn", "mlp")))
    trainable, total = lora.parameter_counts(model)
    width = model.config.n_embd
    per_block = 4 * 8 * (width + width) + 8 * (width + 4 * width) + 8 * (4 * width + width)  # r (in + out) each
    assert trainable == 2 * per_block and total == total_before + trainable
    assert trainable / total < 0.10, f"{trainable:,} of {total:,}"


# -----------------------------------------------------------------------------
# Training: only the adapters


def test_only_the_adapters_train_and_the_optimizer_holds_only_them(lora_run):
    model = lora_run.model
    base_state = torch.load(lora_run.base_dir / "base_checkpoints" / TAG / "model_000000.pt")
    adapters = set(lora.adapter_state(model))
    for name, tensor in model.state_dict().items():
        if name not in adapters:
            assert torch.equal(tensor, base_state[name.replace(".base.", ".")]), name  # bit-identical
    assert all(p.requires_grad == (".lora_" in name) for name, p in model.named_parameters())
    assert any(tensor.abs().sum() > 0 for name, tensor in model.state_dict().items() if ".lora_B." in name)
    [optimizer] = lora_run.optimizers
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in lora.adapter_parameters(model)}
    assert {id(p) for p in optimizer.state} <= {id(p) for p in optimized}


def test_a_lora_checkpoint_holds_only_the_adapters_and_names_its_base(lora_run):
    directory = sft_dir(lora_run.base_dir)
    saved = torch.load(directory / "model_000004.pt")
    assert saved.keys() == lora.adapter_state(lora_run.model).keys()
    base_file = lora_run.base_dir / "base_checkpoints" / TAG / "model_000000.pt"
    meta = json.loads((directory / "meta_000004.json").read_text())
    assert meta["lora"] == {"rank": 8, "alpha": 16.0, "targets": ["attn", "mlp"],
                            "base": {"stage": "base", "tag": TAG, "step": 0,
                                     "model_sha256": hashlib.sha256(base_file.read_bytes()).hexdigest()}}
    assert (directory / "model_000004.pt").stat().st_size < 0.2 * base_file.stat().st_size


def test_resumed_lora_run_repeats_the_uninterrupted_run(lora_run, in_run_dir):
    for path in sft_dir(in_run_dir).glob("*_000004*"):  # as if killed after the step-2 checkpoint
        path.unlink()
    resumed = chat_sft.main(LORA_ARGS + ["--resume"])
    uninterrupted = lora_run.result
    assert resumed["train_losses"] == {3: uninterrupted["train_losses"][3], 4: uninterrupted["train_losses"][4]}
    assert resumed["val_losses"][4] == uninterrupted["val_losses"][4]
    final, resumed_final = (torch.load(sft_dir(d) / "model_000004.pt") for d in (lora_run.base_dir, in_run_dir))
    for name, tensor in final.items():
        assert torch.equal(resumed_final[name], tensor), name


@pytest.mark.parametrize(("flags", "message"), [
    (["--lora-rank=4"], r"--lora-rank: saved 8, now 4"),
    ([], r"--lora-rank: saved 8, now None"),  # a LoRA run resumed as full finetuning
])
def test_resuming_a_lora_run_with_other_lora_flags_is_refused(in_run_dir, flags, message):
    args = [arg for arg in LORA_ARGS if not arg.startswith(("--lora-rank", "--lora-alpha"))] + flags
    with pytest.raises(RunError, match=message + r".*pass the original flags"):
        chat_sft.main(args + ["--resume"])


# -----------------------------------------------------------------------------
# Loading and merging


def test_merged_weights_are_w_plus_scale_b_a_and_give_the_adapter_models_logits(lora_run, tiny_tokenizer):
    adapter_model = lora_run.model.eval()
    merged = lora.merge_lora(copy.deepcopy(adapter_model))
    assert not lora.lora_layers(merged) and all(p.requires_grad for p in merged.parameters())
    for parent, name, layer in lora.lora_layers(adapter_model):
        expected = layer.base.weight + layer.scale * layer.lora_B.weight @ layer.lora_A.weight
        assert layer.scale == 2.0  # alpha 16 / rank 8
        merged_parent = merged.get_submodule(next(k for k, m in adapter_model.named_modules() if m is parent))
        torch.testing.assert_close(getattr(merged_parent, name).weight, expected, rtol=0, atol=1e-6)
    tokens = torch.randint(0, tiny_tokenizer.get_vocab_size(), (2, 32))
    assert_same_logits(logits(merged, tokens), logits(adapter_model, tokens))


def test_load_model_of_a_lora_checkpoint_is_an_ordinary_gpt_with_the_adapter_models_logits(lora_run, in_run_dir,
                                                                                         tiny_tokenizer):
    model, _, meta = load_model("sft", "cpu", phase="train", tag=TAG)
    assert type(model) is GPT and not lora.lora_layers(model) and meta["step"] == 4
    assert all(p.requires_grad for p in model.parameters())  # chat_rl trains what it loads
    assert model.state_dict().keys() == GPT(model.config).state_dict().keys()
    tokens = torch.randint(0, tiny_tokenizer.get_vocab_size(), (2, 32))
    assert_same_logits(logits(model, tokens), logits(lora_run.model.eval(), tokens))


def test_merge_writes_a_full_checkpoint_that_chat_cli_answers_from(in_run_dir, capsys):
    result = chat_sft.main(["--merge", f"--model-tag={TAG}"])
    merged_dir = sft_dir(in_run_dir, f"{TAG}-merged")
    assert result["directory"] == merged_dir and result["step"] == 4
    meta = json.loads((merged_dir / "meta_000004.json").read_text())
    assert "lora" not in meta and "rank_states" not in meta and meta["merged_from"]["step"] == 4
    transparent, _, _ = load_model("sft", "cpu", phase="eval", tag=TAG)
    merged_state = torch.load(merged_dir / "model_000004.pt")
    assert merged_state.keys() == transparent.state_dict().keys()
    for name, tensor in transparent.state_dict().items():
        assert torch.equal(merged_state[name], tensor), name
    capsys.readouterr()
    replies = []
    for tag in (f"{TAG}-merged", TAG):  # the merged checkpoint, then the LoRA one loaded transparently
        chat_args = ["-p", "Hello there", "--temperature=0", "--max-tokens=8", "--device-type=cpu", f"--tag={tag}"]
        assert chat_cli.main(chat_args) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0].strip() and replies[0] == replies[1]


def test_merging_again_sets_the_earlier_merge_aside(in_run_dir):
    chat_sft.main(["--merge"])
    chat_sft.main(["--merge"])
    names = sorted(path.name for path in (in_run_dir / "chatsft_checkpoints").iterdir())
    assert names[:2] == [TAG, f"{TAG}-merged"] and names[2].startswith(f"{TAG}-merged.replaced-")


def test_merge_refuses_a_checkpoint_that_is_not_a_lora_one(in_run_dir):
    chat_sft.main(["--merge"])
    with pytest.raises(CheckpointError, match=r"is a full checkpoint, not a LoRA one: there is nothing to merge"):
        chat_sft.main(["--merge", f"--model-tag={TAG}-merged"])


# -----------------------------------------------------------------------------
# A changed or missing base, bad flags


def test_a_changed_base_checkpoint_is_refused(in_run_dir, tiny_tokenizer):
    write_base_checkpoint(in_run_dir, tiny_tokenizer, seed=1)  # retrained under the same tag and step
    refusal = r"LoRA adapters over the base checkpoint d2 step 0, but .*model_000000.pt has changed since \(sha256"
    with pytest.raises(CheckpointError, match=refusal + r".*restore that checkpoint"):
        load_model("sft", "cpu", phase="eval")
    with pytest.raises(CheckpointError, match=refusal):
        chat_sft.main(["--merge"])
    with pytest.raises(CheckpointError, match=refusal):
        chat_sft.main(LORA_ARGS + ["--resume"])


def test_a_missing_base_checkpoint_is_refused(in_run_dir):
    shutil.rmtree(in_run_dir / "base_checkpoints")
    with pytest.raises(CheckpointError, match=r"but .*model_000000.pt is missing: restore that checkpoint"):
        load_model("sft", "cpu", phase="eval")


@pytest.mark.parametrize(("flags", "message"), [
    (["--lora-rank=0"], "--lora-rank must be >= 1, got 0"),
    (["--lora-rank=8", "--lora-targets=attn,ffn"],
     "--lora-targets 'attn,ffn': expected a comma-separated list of attn, mlp"),
    (["--lora-rank=8", "--lora-alpha=0"], "--lora-alpha must be > 0"),
    (["--lora-targets=attn"], "--lora-targets needs --lora-rank"),
    (["--merge", "--lora-rank=8"], "--merge folds an existing LoRA checkpoint"),
    (["--lora-rank=8", "--normuon"], "--normuon is an option of the full model's optimizers"),
    (["--lora-rank=8", "--muon-ns=polar_express"], "--muon-ns is an option of the full model's optimizers"),
])
def test_bad_lora_flags_are_clear_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chat_sft.parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_lora_targets_are_canonical_so_their_order_does_not_change_the_run():
    args = chat_sft.parse_args(["--lora-rank=4", "--lora-targets=mlp, attn"])
    assert (args.lora_targets, args.lora_alpha, args.lora_lr) == ("attn,mlp", 4.0, lora.DEFAULT_LR)
