"""Midtraining, SFT and RL end to end on a tiny model: base -> mid -> sft -> rl, each stage saving a checkpoint the next
one loads; losses fall on tiny overfit sets; a resumed run repeats the interrupted one exactly; the RL reward and
masks are right; a missing or mismatched input checkpoint fails with a message that names the fix."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pytest
import torch

from nanochat.chat_data import collate_padded
from nanochat.checkpoint import CheckpointError, save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.tokenizer import Tokenizer
from scripts import chat_rl, chat_sft, mid_train
from tasks import spellingbee
from tasks.common import TaskMixture
from tasks.gsm8k import GSM8K
from tasks.identity import IdentityConversations

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
TAG = "d2"

# a few steps each; mid accumulates gradients over two micro-batches, as a GPU run with a fixed total batch does
MID_ARGS = ["--device-type=cpu", "--max-seq-len=64", "--device-batch-size=2", "--total-batch-size=256",
            "--num-iterations=4", "--eval-every=2", "--eval-tokens=128", "--save-every=2"]
SFT_ARGS = ["--device-type=cpu", "--max-seq-len=64", "--device-batch-size=2", "--examples-per-step=2",
            "--num-iterations=4", "--eval-every=2", "--eval-steps=1", "--eval-metrics-every=-1",
            "--eval-metrics-max-problems=4", "--save-every=2"]
RL_ARGS = ["--device-type=cpu", "--num-steps=2", "--num-samples=2", "--examples-per-step=2", "--device-batch-size=2",
           "--max-new-tokens=6", "--eval-every=2", "--eval-examples=2", "--save-every=1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def use_dirs(monkeypatch, base_dir: Path) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(DATA_DIR))
    # MMLU is not in the mirror: fail its download at once instead of retrying the network for half a minute. The
    # libraries read the environment when first imported, so an earlier test's import would make setenv too late.
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # for the torchrun test's subprocesses


def write_base_checkpoint(base_dir: Path, tokenizer: Tokenizer, seed: int = 0, **recipe) -> None:
    """What scripts.base_train leaves behind, from a tiny random GPT: the tokenizer and a base checkpoint. `recipe`:
    GPTConfig fields of the 2026-recipe changes to turn on."""
    tokenizer.save(base_dir / "tokenizer")
    config = replace(model_config_from_depth(2, tokenizer.get_vocab_size(), sequence_len=64), **recipe)
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    meta = {"model_config": asdict(config), "tokenizer_fingerprint": tokenizer.fingerprint(), "step": 0}
    save_checkpoint(base_dir / "base_checkpoints" / TAG, 0, model.state_dict(), None, meta)


def checkpoint_steps(base_dir: Path, stage_dir: str) -> list[int]:
    return sorted(int(path.stem.split("_")[1]) for path in (base_dir / stage_dir / TAG).glob("model_*.pt"))


def read_meta(base_dir: Path, stage_dir: str, step: int) -> dict:
    return json.loads((base_dir / stage_dir / TAG / f"meta_{step:06d}.json").read_text())


def delete_checkpoint(base_dir: Path, stage_dir: str, step: int) -> None:
    for path in (base_dir / stage_dir / TAG).glob(f"*_{step:06d}*"):
        path.unlink()


@dataclass
class Pipeline:
    base_dir: Path
    mid: dict
    sft: dict
    rl: dict


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_tokenizer) -> Pipeline:
    base_dir = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_dirs(monkeypatch, base_dir)
        write_base_checkpoint(base_dir, tiny_tokenizer)
        mid = mid_train.main(MID_ARGS)
        sft = chat_sft.main(SFT_ARGS)
        rl = chat_rl.main(RL_ARGS)
    return Pipeline(base_dir, mid, sft, rl)


# -----------------------------------------------------------------------------
# The chain


def test_each_stage_saves_a_checkpoint_that_the_next_stage_loads(pipeline):
    base_dir = pipeline.base_dir
    assert checkpoint_steps(base_dir, "mid_checkpoints") == [2, 4]
    assert checkpoint_steps(base_dir, "chatsft_checkpoints") == [2, 4]
    assert checkpoint_steps(base_dir, "chatrl_checkpoints") == [1, 2]
    assert read_meta(base_dir, "mid_checkpoints", 4)["source"] == {"stage": "base", "tag": TAG, "step": 0}
    assert read_meta(base_dir, "chatsft_checkpoints", 4)["source"] == {"stage": "mid", "tag": TAG, "step": 4}
    assert read_meta(base_dir, "chatrl_checkpoints", 2)["source"] == {"stage": "sft", "tag": TAG, "step": 4}
    rl_meta = read_meta(base_dir, "chatrl_checkpoints", 2)
    assert rl_meta["tokenizer_fingerprint"] == Tokenizer.from_directory(base_dir / "tokenizer").fingerprint()


# every 2026-recipe change on: a 16-position window on layer 0 (context 64), the vocabulary padded to a multiple of 64
EVERY_RECIPE_CHANGE = {"value_embeddings": True, "layer_scalars": True, "smear": True, "backout": True,
                       "window_pattern": "SL", "qk_gain": 1.2, "vocab_multiple": 64}


def test_a_base_model_with_every_recipe_change_goes_through_mid_sft_and_rl(tiny_tokenizer, monkeypatch, tmp_path):
    use_dirs(monkeypatch, tmp_path)
    write_base_checkpoint(tmp_path, tiny_tokenizer, **EVERY_RECIPE_CHANGE)
    mid_train.main(MID_ARGS)
    chat_sft.main(SFT_ARGS)
    rl = chat_rl.main(RL_ARGS)
    for stage_dir, step in (("mid_checkpoints", 4), ("chatsft_checkpoints", 4), ("chatrl_checkpoints", 2)):
        config = read_meta(tmp_path, stage_dir, step)["model_config"]
        assert {name: config[name] for name in EVERY_RECIPE_CHANGE} == EVERY_RECIPE_CHANGE
    assert all(math.isfinite(value) for value in rl.values() if isinstance(value, float))


def test_midtraining_reports_its_mixture_the_tasks_left_out_and_the_packing_counts(pipeline):
    section = json.loads((pipeline.base_dir / "report" / "midtraining.json").read_text())["data"]
    mixture, packing, outcome = section[1], section[2], section[3]
    assert mixture["training mixture"]["GSM8K"] == len(GSM8K(split="train"))
    assert "MMLU auxiliary_train" in mixture["tasks left out"]  # not in the mirror, and offline
    assert pipeline.mid["train_missing"].keys() == {"MMLU auxiliary_train"}
    stats = pipeline.mid["packing"]
    assert packing["conversations packed"] == stats.conversations > 0
    assert packing["conversations truncated"] == stats.truncated
    assert packing["conversations dropped"] == stats.dropped
    assert outcome["final train loss"] == pipeline.mid["train_losses"][4]
    assert outcome["final validation loss"] == pipeline.mid["val_losses"][4]


def test_sft_and_rl_report_their_sections_and_metrics(pipeline):
    report_dir = pipeline.base_dir / "report"
    sft = json.loads((report_dir / "chat-sft.json").read_text())["data"]
    assert set(sft[3]) >= {"final train loss", "final validation loss", "ARC-Easy accuracy", "ARC-Challenge accuracy"}
    assert 0.0 <= sft[3]["ARC-Easy accuracy"] <= 1.0
    rl = json.loads((report_dir / "chat-rl.json").read_text())["data"]
    assert rl[2]["steps"] == 2 and 0.0 <= rl[2]["final pass@1"] <= rl[2]["final pass@2"] <= 1.0
    rows = [json.loads(line) for line in (report_dir / "metrics_chat_rl.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "reward" in row] == [1, 2]


# -----------------------------------------------------------------------------
# Resume


def test_resumed_midtraining_repeats_the_uninterrupted_run(pipeline, monkeypatch, tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(pipeline.base_dir, base_dir)
    use_dirs(monkeypatch, base_dir)
    delete_checkpoint(base_dir, "mid_checkpoints", 4)  # as if killed after the step-2 checkpoint
    resumed = mid_train.main(MID_ARGS + ["--resume"])
    assert resumed["train_losses"] == {3: pipeline.mid["train_losses"][3], 4: pipeline.mid["train_losses"][4]}
    assert resumed["val_losses"] == {2: pipeline.mid["val_losses"][2], 4: pipeline.mid["val_losses"][4]}
    assert resumed["packing"] == pipeline.mid["packing"]


def test_resumed_sft_repeats_the_uninterrupted_run(pipeline, monkeypatch, tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(pipeline.base_dir, base_dir)
    use_dirs(monkeypatch, base_dir)
    delete_checkpoint(base_dir, "chatsft_checkpoints", 4)
    resumed = chat_sft.main(SFT_ARGS + ["--resume"])
    assert resumed["train_losses"] == {3: pipeline.sft["train_losses"][3], 4: pipeline.sft["train_losses"][4]}
    assert resumed["val_losses"][4] == pipeline.sft["val_losses"][4]
    assert resumed["mc_accuracy"] == pipeline.sft["mc_accuracy"]


def test_resumed_rl_repeats_the_uninterrupted_run(pipeline, monkeypatch, tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(pipeline.base_dir, base_dir)
    use_dirs(monkeypatch, base_dir)
    shutil.rmtree(base_dir / "chatrl_checkpoints")
    # a tiny random model never answers GSM8K right; an arbitrary reward gives the update something to learn
    monkeypatch.setattr(chat_rl, "gsm8k_reward",
                        lambda task, conversation, completion: float(sum(map(ord, completion)) % 2))
    uninterrupted = chat_rl.main(RL_ARGS)
    assert any(loss != 0.0 for loss in uninterrupted["losses"].values())
    final_weights = torch.load(base_dir / "chatrl_checkpoints" / TAG / "model_000002.pt")
    delete_checkpoint(base_dir, "chatrl_checkpoints", 2)
    resumed = chat_rl.main(RL_ARGS + ["--resume"])
    assert resumed["losses"] == {2: uninterrupted["losses"][2]}
    assert resumed["rewards"] == {2: uninterrupted["rewards"][2]}
    resumed_weights = torch.load(base_dir / "chatrl_checkpoints" / TAG / "model_000002.pt")
    for name, tensor in final_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name


def test_midtraining_runs_under_torchrun_and_resuming_needs_the_same_number_of_ranks(tiny_tokenizer, monkeypatch,
                                                                                      tmp_path):
    use_dirs(monkeypatch, tmp_path)
    write_base_checkpoint(tmp_path, tiny_tokenizer)
    args = ["--device-type=cpu", "--max-seq-len=64", "--device-batch-size=2", "--total-batch-size=512",
            "--num-iterations=2", "--eval-every=-1", "--eval-tokens=256"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "-m", "scripts.mid_train", *args]
    result = subprocess.run(launch, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    directory = tmp_path / "mid_checkpoints" / TAG
    assert sorted(path.name for path in directory.glob("optim_*")) == ["optim_000002_rank0.pt",
                                                                        "optim_000002_rank1.pt"]
    rank_states = read_meta(tmp_path, "mid_checkpoints", 2)["rank_states"]
    assert len(rank_states) == 2 and rank_states[0]["data"] != rank_states[1]["data"]  # each rank its own rows
    with pytest.raises(ValueError, match=r"written by 2 ranks but this run has 1: .*--nproc_per_node=2"):
        mid_train.main(args + ["--resume"])


# -----------------------------------------------------------------------------
# SpellingBee's share of the midtraining and SFT mixtures


def test_spelling_keeps_its_full_mixture_share_and_does_not_drown_a_small_mirror():
    def sized(tasks, full_rows, real_full_rows):
        return len(spellingbee.sized_beside(tasks, full_rows, real_full_rows))
    real_rows_600 = {"real": spellingbee.SpellingBee(size=600, split="test")}  # real rows, as far as sizes go
    assert sized(real_rows_600, 80, 400) == 80  # 120 by the share, capped at the full size
    assert sized(real_rows_600, 80, 4_000) == 12  # the full mixture's share
    assert sized({"identity": IdentityConversations(size=50)}, 80, 400) == 1  # identity's generated rows are not real
    for script, full_rows in ((mid_train, 80_000), (chat_sft, 300)):
        _, sizes, _ = script.train_mixture({}, "default")  # the sample mirror: a few hundred real rows
        real_rows = sum(rows for name, rows in sizes.items() if name not in ("identity", "SpellingBee"))
        assert 0 < real_rows < 10_000, sizes
        assert 1 <= sizes["SpellingBee"] < full_rows / 10, sizes  # was the full 80,000 (of 81,635) and 300
        assert sizes["SpellingBee"] / (real_rows + sizes["SpellingBee"]) < 0.15, sizes
        _, custom_only, _ = script.train_mixture({"mine": IdentityConversations(size=3)}, "none")
        assert custom_only == {"mine": 3}  # a mixture of yours alone gets no spelling


# -----------------------------------------------------------------------------
# Losses fall on tiny overfit sets


def tiny_mixture(*_mixture_args):
    """Four identity conversations: every step sees the same rows, so the loss must fall."""
    task = TaskMixture([IdentityConversations(size=4)])
    return task, {"identity": len(task)}, {}


def test_midtraining_loss_falls_on_a_tiny_overfit_set(tiny_tokenizer, monkeypatch, tmp_path):
    use_dirs(monkeypatch, tmp_path)
    write_base_checkpoint(tmp_path, tiny_tokenizer)
    monkeypatch.setattr(mid_train, "train_mixture", tiny_mixture)
    monkeypatch.setattr(mid_train, "val_mixture", tiny_mixture)
    result = mid_train.main(["--device-type=cpu", "--max-seq-len=128", "--device-batch-size=2",
                             "--total-batch-size=256", "--num-iterations=6", "--eval-every=-1", "--eval-tokens=256"])
    losses = result["train_losses"]
    assert losses[6] < 0.5 * losses[1], losses
    assert result["val_losses"][6] < 0.5 * losses[1]


def test_midtraining_sft_and_rl_in_fp16_scale_the_loss_and_still_learn(tiny_tokenizer, monkeypatch, tmp_path):
    """NANOCHAT_DTYPE=float16 (what GPUs without bf16 run): a loss scaler, saved with the loop state."""
    use_dirs(monkeypatch, tmp_path)
    monkeypatch.setenv("NANOCHAT_DTYPE", "float16")
    write_base_checkpoint(tmp_path, tiny_tokenizer)
    monkeypatch.setattr(mid_train, "train_mixture", tiny_mixture)
    monkeypatch.setattr(mid_train, "val_mixture", tiny_mixture)
    result = mid_train.main(["--device-type=cpu", "--max-seq-len=128", "--device-batch-size=2",
                             "--total-batch-size=256", "--num-iterations=6", "--eval-every=-1", "--eval-tokens=256"])
    assert result["train_losses"][6] < 0.5 * result["train_losses"][1], result["train_losses"]
    assert read_meta(tmp_path, "mid_checkpoints", 6)["loop_state"]["loss_scaler"]["scale"] > 0
    chat_sft.main([("--num-iterations=1" if flag.startswith("--num-iterations") else flag) for flag in SFT_ARGS])
    assert read_meta(tmp_path, "chatsft_checkpoints", 1)["loop_state"]["loss_scaler"]["scale"] > 0
    chat_rl.main([*RL_ARGS[:1], "--num-steps=1", *RL_ARGS[2:]])
    assert read_meta(tmp_path, "chatrl_checkpoints", 1)["loop_state"]["loss_scaler"]["scale"] > 0


def test_sft_loss_falls_on_a_tiny_overfit_set(tiny_tokenizer, monkeypatch, tmp_path):
    use_dirs(monkeypatch, tmp_path)
    write_base_checkpoint(tmp_path, tiny_tokenizer)
    monkeypatch.setattr(chat_sft, "train_mixture", tiny_mixture)
    result = chat_sft.main(["--source=base", "--device-type=cpu", "--max-seq-len=128", "--device-batch-size=2",
                            "--examples-per-step=4", "--num-iterations=6", "--init-lr-frac=1.0", "--eval-every=-1",
                            "--eval-steps=1", "--eval-metrics-every=-1", "--eval-metrics-max-problems=2"])
    losses = result["train_losses"]
    assert losses[6] < 0.5 * losses[1], losses


def test_policy_gradient_raises_the_rewarded_completion_and_lowers_the_other(tiny_tokenizer):
    torch.manual_seed(0)
    model = GPT(model_config_from_depth(2, tiny_tokenizer.get_vocab_size(), sequence_len=64))
    model.init_weights()
    prompt = tiny_tokenizer.render_for_completion({"messages": [{"role": "user", "content": "What is 6 x 7?"}]})
    good, bad = tiny_tokenizer.encode("#### 42"), tiny_tokenizer.encode("#### 41")
    end = tiny_tokenizer.encode_special("<|assistant_end|>")
    sequences = [(prompt + ids + [end], [0] * len(prompt) + [1] * (len(ids) + 1)) for ids in (good, bad)]
    advantages = [0.5, -0.5]  # rewards 1 and 0, minus their mean
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def log_probs() -> list[float]:
        inputs, targets = collate_padded(sequences, end)
        with torch.no_grad():
            nll = model(inputs, targets, loss_reduction="none")
        return (-nll.sum(dim=1)).tolist()

    before = log_probs()
    losses = []
    for _ in range(5):
        losses.append(chat_rl.policy_gradient_step(model, sequences, advantages, 1, end, nullcontext(),
                                                   torch.device("cpu")))
        optimizer.step()
        model.zero_grad(set_to_none=True)
    after = log_probs()
    assert after[0] > before[0] and after[1] < before[1]
    assert losses[-1] < losses[0]


# -----------------------------------------------------------------------------
# RL: rewards on real GSM8K problems, and which sampled tokens are trained


def gsm8k_problem(task: GSM8K, question_start: str) -> dict:
    return next(task[i] for i in range(len(task)) if task[i]["messages"][0]["content"].startswith(question_start))


@pytest.mark.parametrize(("question_start", "completion", "reward"), [
    ("Natalia sold clips", "She sold 48/2 = 24 in May, so 48 + 24 = 72 in total.\n#### 72", 1.0),
    ("Natalia sold clips", "She sold 48 + 48 = 96.\n#### 96", 0.0),
    ("Natalia sold clips", "She sold 72 clips altogether.", 0.0),  # no '####': no answer
    ("Natalia sold clips", "#### 72.00", 1.0),
    ("James creates a media empire", "He makes a profit of $448,000.\n#### 448,000", 1.0),  # commas in the answer
    ("Adam earns $40 daily", "#### 1080", 1.0),  # the reference itself is written "#### 1,080"
    ("Adam earns $40 daily", "#### 1,800", 0.0),
])
def test_the_reward_is_one_exactly_for_a_correct_final_answer(question_start, completion, reward):
    task = GSM8K(split="train")
    assert chat_rl.gsm8k_reward(task, gsm8k_problem(task, question_start), completion) == reward


class ScriptedModel(GPT):
    """A GPT whose next token is a fixed script (position k of the completion predicts script[k]), so the engine's
    tool handling can be checked without a trained model."""

    def __init__(self, config, script: list[int], prompt_length: int):
        super().__init__(config)
        self.script, self.prompt_length = script, prompt_length

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        batch, length = idx.shape
        logits = torch.full((batch, length, self.config.vocab_size), -100.0)
        for row in range(batch):
            for t in range(length):
                k = int(kv_cache.pos[row]) + t + 1 - self.prompt_length
                logits[row, t, self.script[min(k, len(self.script) - 1)]] = 100.0
        kv_cache.pos += length
        return logits


def test_rl_trains_on_sampled_tokens_only_never_the_prompt_or_the_forced_tool_output(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "What is 20 + 22?"}]})
    special = tok.encode_special
    # the model calls the tool; the engine forces <|output_start|>42<|output_end|> into the stream
    script = (tok.encode("Let me add. ") + [special("<|python_start|>")] + tok.encode("20 + 22")
              + [special("<|python_end|>"), special("<|output_start|>")] + tok.encode("42")
              + [special("<|output_end|>")] + tok.encode(" So #### 42") + [special("<|assistant_end|>")])
    model = ScriptedModel(model_config_from_depth(1, tok.get_vocab_size(), sequence_len=64), script, len(prompt))
    engine = Engine(model, tok)
    [(ids, mask)] = chat_rl.sample_completions(engine, prompt, num_samples=1, max_new_tokens=60, temperature=1.0,
                                               top_k=0, seed=0)
    assert ids == prompt + script
    _, targets = collate_padded([(ids, mask)], pad_id=0)
    trained = tok.decode([t for t in targets[0].tolist() if t >= 0])
    assert trained == "Let me add. <|python_start|>20 + 22<|python_end|> So #### 42<|assistant_end|>"
    completion = chat_rl.completion_text(engine, ids, len(prompt))
    assert completion.endswith("So #### 42") and "<|assistant_end|>" not in completion


# -----------------------------------------------------------------------------
# Clear errors at the boundary


def test_midtraining_without_a_base_checkpoint_says_to_run_base_train(tiny_tokenizer, monkeypatch, tmp_path):
    use_dirs(monkeypatch, tmp_path)
    tiny_tokenizer.save(tmp_path / "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"no base checkpoint in .*base_checkpoints: run python -m "
                                                r"scripts\.base_train first"):
        mid_train.main(MID_ARGS)


def test_sft_without_a_mid_checkpoint_says_to_run_mid_train(tiny_tokenizer, monkeypatch, tmp_path):
    use_dirs(monkeypatch, tmp_path)
    write_base_checkpoint(tmp_path, tiny_tokenizer)
    with pytest.raises(FileNotFoundError, match=r"no mid checkpoint in .*mid_checkpoints: run python -m "
                                                r"scripts\.mid_train first"):
        chat_sft.main(SFT_ARGS)


def test_resume_without_a_checkpoint_of_the_stage_says_to_start_without_resume(tiny_tokenizer, monkeypatch, tmp_path):
    use_dirs(monkeypatch, tmp_path)
    write_base_checkpoint(tmp_path, tiny_tokenizer)
    with pytest.raises(FileNotFoundError, match="without --resume"):
        mid_train.main(MID_ARGS + ["--resume"])


def test_a_base_model_trained_with_another_tokenizer_is_refused(tiny_tokenizer, monkeypatch, tmp_path):
    use_dirs(monkeypatch, tmp_path)
    write_base_checkpoint(tmp_path, tiny_tokenizer)
    other = Tokenizer({bytes([i]): i for i in range(256)})  # a different tokenizer now sits in the base dir
    shutil.rmtree(tmp_path / "tokenizer")
    other.save(tmp_path / "tokenizer")
    with pytest.raises(CheckpointError, match=r"was trained with tokenizer \w+, but .*tokenizer holds tokenizer \w+: "
                                             r"restore the tokenizer this model was trained with"):
        mid_train.main(MID_ARGS)
