"""The token budget and --batch-from-depth: the batch grows with the budget as tokens^0.383 from 2^19 at depth 12,
the learning rates as sqrt(batch / 2^19), the ratio can count only the matrices and head, and base_train trains,
refuses conflicting flags and resumes with the batch it computed."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from nanochat.budget import batch_from_depth, budget_parameters, training_steps
from nanochat.gpt import GPT, GPTConfig, model_config_from_depth
from nanochat.plan import batch_lr_scale, scaled_batch_size
from scripts import base_train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_batch_grows_as_tokens_to_the_0383_rounded_to_a_power_of_two():
    assert scaled_batch_size(1e9, 1e9, 2048) == 2 ** 19
    assert scaled_batch_size(2e9, 1e9, 2048) == 2 ** 19  # 1.30 x 2^19: log2 19.38 rounds down
    assert scaled_batch_size(10e9, 1e9, 2048) == 2 ** 20  # 2.41 x 2^19: log2 20.27
    assert scaled_batch_size(0.1e9, 1e9, 2048) == 2 ** 18  # 0.41 x 2^19: log2 17.7
    assert scaled_batch_size(1e9, 1e9, 3 * 2 ** 17) == 3 * 2 ** 17  # a whole number of micro-steps (4/3 -> 1)
    assert scaled_batch_size(1e3, 1e9, 2 ** 16) == 2 ** 16  # never below one micro-step
    assert batch_lr_scale(2 ** 21) == 2.0 and batch_lr_scale(2 ** 17) == 0.5
    with pytest.raises(ValueError, match="must be positive"):
        scaled_batch_size(0, 1e9, 2048)


def test_batch_from_depth_is_the_reference_at_depth_12_and_follows_the_parameter_budget():
    depth12 = model_config_from_depth(12, 65536, 2048)
    assert batch_from_depth(depth12, 8, "matrices_and_head", 2 ** 16) == (2 ** 19, 1.0)
    depth26 = model_config_from_depth(26, 65536, 2048)
    with torch.device("meta"):
        counts = {depth: GPT(config).param_counts() for depth, config in ((12, depth12), (26, depth26))}
    ratio = budget_parameters(counts[26], "matrices_and_head") / budget_parameters(counts[12], "matrices_and_head")
    expected = 2 ** round(19 + 0.383 * torch.tensor(ratio).log2().item())
    assert batch_from_depth(depth26, 8, "matrices_and_head", 2 ** 16) == (expected, (expected / 2 ** 19) ** 0.5)
    assert expected == 2 ** 20  # ~6.5x the budget: the 1M-token batch of the public depth-24/26 runs


def test_the_ratio_can_count_only_the_matrices_and_head():
    with torch.device("meta"):
        counts = GPT(GPTConfig(vocab_size=301, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                               value_embeddings=True)).param_counts()
    assert budget_parameters(counts, "total") == counts["total"]
    assert budget_parameters(counts, "matrices_and_head") == counts["hidden_matrices"] + counts["lm_head"]
    args = argparse.Namespace(num_iterations=-1, target_flops=-1, target_param_data_ratio=8,
                              ratio_params="matrices_and_head", total_batch_size=1024)
    assert training_steps(args, counts, 1.0) == round(8 * (counts["hidden_matrices"] + counts["lm_head"]) / 1024)
    with pytest.raises(ValueError, match="ratio_params must be one of"):
        budget_parameters(counts, "embeddings")


TRAIN_FLAGS = ["--depth=2", "--max-seq-len=64", "--device-batch-size=4", "--eval-every=-1", "--eval-tokens=256",
               "--sample-every=-1", "--batch-from-depth", "--ratio-params=matrices_and_head",
               "--target-param-data-ratio=0.5"]


def test_base_train_sizes_the_batch_from_depth_and_resumes_with_it(base_dir, tiny_tokenizer, capsys):
    tiny_tokenizer.save(base_dir / "tokenizer")
    torch.save(torch.tensor(tiny_tokenizer.token_byte_lengths()), base_dir / "tokenizer" / "token_bytes.pt")
    assert base_train.main([*TRAIN_FLAGS, "--save-every=2"]) == 0
    out = capsys.readouterr().out
    config = model_config_from_depth(2, tiny_tokenizer.get_vocab_size(), 64)
    batch, lr_scale = batch_from_depth(config, 0.5, "matrices_and_head", 4 * 64)
    assert f"batch from depth: {batch:,} tokens a step" in out and f"learning rates x {lr_scale:.3f}" in out
    metas = sorted((base_dir / "base_checkpoints" / "d2").glob("meta_*.json"))
    meta = json.loads(metas[-1].read_text())
    assert meta["user_config"]["total_batch_size"] == batch
    with torch.device("meta"):
        counts = GPT(config).param_counts()
    steps = round(0.5 * (counts["hidden_matrices"] + counts["lm_head"]) / batch)
    assert metas[-1].name == f"meta_{steps:06d}.json"
    assert base_train.main([*TRAIN_FLAGS, "--save-every=2", "--resume"]) == 0  # the same batch: the check holds


@pytest.mark.parametrize("flag", ["--total-batch-size=1024", "--num-iterations=5", "--target-flops=1e12"])
def test_base_train_refuses_batch_from_depth_with_another_budget(flag, capsys):
    with pytest.raises(SystemExit):
        base_train.parse_args([*TRAIN_FLAGS, flag])
    assert "--batch-from-depth sizes the batch from --target-param-data-ratio" in capsys.readouterr().err
