"""The 2026-recipe model changes behind GPTConfig fields (value embeddings, layer scalars, smear, backout, sliding
windows, the QK gain, vocabulary padding) and the uniform init: off, the model is today's to the bit; on, it trains,
decodes through the KV cache, the Engine and the continuous-batching scheduler exactly as a plain forward over the
whole sequence, loads from an old meta, the exports refuse it by name, and base_train takes the flags and refuses a
resume that changes them."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict

import pytest
import torch

from nanochat import attention
from nanochat.attention import apply_rotary, attention_window
from nanochat.batching import SamplingParams, Scheduler
from nanochat.checkpoint import build_model
from nanochat.engine import Engine
from nanochat.export_c import check_exportable as check_c_exportable
from nanochat.gpt import GPT, SCALAR_LR, GPTConfig, norm
from nanochat.hf import check_exportable
from nanochat.loading import ExportError
from nanochat.optim import Muon
from nanochat.training import RunError, check_same_run
from scripts import base_train

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURES = ["value_embeddings", "layer_scalars", "smear", "backout"]  # the ones that add parameters
CASES = [[feature] for feature in FEATURES] + [FEATURES]
CASE_IDS = [*FEATURES, "all"]
SHAPE = {"sequence_len": 64, "n_layer": 3, "n_head": 4, "n_kv_head": 2, "n_embd": 64}  # GQA, VE on layers 0 and 2
# the changes that add no parameter, at the values they are tested with: windows of 64 // 4 = 16 positions on
# layers 0 and 1 (the last is always full), a sharper softmax, 301 tokens padded to 320 rows
ATTENTION_SETTINGS = {"window_pattern": "SSL", "qk_gain": 1.3, "vocab_multiple": 64}
EVERYTHING = FEATURES + list(ATTENTION_SETTINGS)
# the decoding tests run every change alone and all of them together
DECODE_CASES = CASES[:-1] + [[name] for name in ATTENTION_SETTINGS] + [EVERYTHING]
DECODE_IDS = [*FEATURES, *ATTENTION_SETTINGS, "all"]


def config_settings(features: list[str]) -> dict:
    """GPTConfig keyword arguments that turn `features` on."""
    return {name: ATTENTION_SETTINGS.get(name, True) for name in features}


def recipe_model(features: list[str], vocab_size: int = 301, seed: int = 0) -> GPT:
    """A fresh model with `features` on, every weight perturbed and every new scalar moved off its init, so each
    change really acts on the outputs (at init smear and backout are off and every block is the identity)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, **SHAPE, **config_settings(features)))
    model.init_weights()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        for gate in model.gate_parameters():
            gate.normal_(std=0.5)
        for name, value in (("smear_lambda", 0.8), ("backout_lambda", 0.4)):
            if hasattr(model, name):
                getattr(model, name).fill_(value)
        if model.config.layer_scalars:
            model.resid_lambdas.normal_(1.0, 0.2)
            model.x0_lambdas.normal_(0.0, 0.3)
    return model.eval()


def tokens(*shape: int, seed: int, vocab_size: int = 301) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# Off by default: today's model to the bit

# Recorded with nanochat/gpt.py as it was before these fields existed: torch.manual_seed(0), GOLDEN_CONFIG,
# init_weights, then the output projections ~N(0, 0.1) and the LM head ~N(0, 0.3); the logits of tokens(2, 16, seed=1).
GOLDEN_CONFIG = {"sequence_len": 32, "vocab_size": 97, "n_layer": 3, "n_head": 4, "n_kv_head": 2, "n_embd": 32}
GOLDEN_PARAMETER_ABS_SUM = 7016.760845613102
GOLDEN_LOGITS_SUM, GOLDEN_LOGITS_ABS_SUM = -221.46593123674393, 4274.125659763813
GOLDEN_LAST_LOGITS = [0.3822791576385498, -0.8601397275924683, 2.603917121887207, 0.7221400737762451]


def golden_model(config: dict) -> GPT:
    torch.manual_seed(0)
    model = build_model({"model_config": config}, "cpu", "eval")
    with torch.no_grad():
        for block in model.transformer.h:
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.1)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.1)
        torch.nn.init.normal_(model.lm_head.weight, std=0.3)
    return model


def plain_transformer_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Today's forward written out from the model's own blocks: normed embedding, pre-norm blocks, final norm."""
    T = idx.size(1)
    cos, sin = model.cos[None, None, :T], model.sin[None, None, :T]
    x = norm(model.transformer.wte(idx))
    for block in model.transformer.h:
        x = x + block.attn(norm(x), None, cos, sin, None, None, T, None)
        x = x + block.mlp(norm(x))
    return model.logits(norm(x))


def today_state_dict_keys(n_layer: int) -> list[str]:
    layers = [f"transformer.h.{i}.{name}.weight" for i in range(n_layer)
              for name in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    return ["transformer.wte.weight", *layers, "lm_head.weight"]


@pytest.mark.parametrize("features", CASES, ids=CASE_IDS)
def test_a_meta_without_the_fields_builds_todays_model_to_the_bit(features):
    old_meta_config = dict(GOLDEN_CONFIG)  # as written before the fields existed
    explicitly_off = {**GOLDEN_CONFIG, **dict.fromkeys(features, False)}
    idx = tokens(2, 16, seed=1, vocab_size=97)
    models = [golden_model(config) for config in (old_meta_config, explicitly_off)]
    for model in models:
        assert not any(getattr(model.config, feature) for feature in FEATURES)
        assert list(model.state_dict()) == today_state_dict_keys(3)
        assert sum(p.double().abs().sum().item() for p in model.parameters()) == pytest.approx(
            GOLDEN_PARAMETER_ABS_SUM, rel=1e-9)
    with torch.no_grad():
        logits = [model(idx) for model in models]
        assert torch.equal(logits[0], logits[1])
        assert torch.equal(logits[0], plain_transformer_logits(models[0], idx))
    assert logits[0].double().sum().item() == pytest.approx(GOLDEN_LOGITS_SUM, rel=1e-5)
    assert logits[0].double().abs().sum().item() == pytest.approx(GOLDEN_LOGITS_ABS_SUM, rel=1e-6)
    assert logits[0][0, -1, :4].tolist() == pytest.approx(GOLDEN_LAST_LOGITS, abs=1e-5)


def test_todays_model_keeps_its_optimizer_groups_and_counts():
    model = GPT(GPTConfig(vocab_size=301, **SHAPE))
    adamw, muon = model.setup_optimizers()
    assert [group["params"] for group in adamw.param_groups] == [[model.lm_head.weight],
                                                                  [model.transformer.wte.weight]]
    assert sum(len(group["params"]) for group in muon.param_groups) == 6 * 3
    assert list(model.param_counts()) == ["embedding", "lm_head", "hidden_matrices", "total"]


# -----------------------------------------------------------------------------
# On: parameters, optimizer groups, FLOPs, training


def test_each_feature_adds_exactly_its_parameters():
    kv_width = 2 * 16
    added = {
        "value_embeddings": {"value_embeds.0.weight": (301, kv_width), "value_embeds.2.weight": (301, kv_width),
                             "transformer.h.0.attn.ve_gate": (2, 32), "transformer.h.2.attn.ve_gate": (2, 32)},
        "layer_scalars": {"resid_lambdas": (3,), "x0_lambdas": (3,)},
        "smear": {"smear_gate": (32,), "smear_lambda": ()},
        "backout": {"backout_lambda": ()},
    }
    today = set(today_state_dict_keys(3))
    for feature, expected in added.items():
        state = GPT(GPTConfig(vocab_size=301, **SHAPE, **{feature: True})).state_dict()
        assert set(state) - today == set(expected) and today <= set(state)
        assert {name: tuple(state[name].shape) for name in expected} == expected


def test_new_embeddings_go_with_the_embedding_and_gates_and_scalars_to_adamw_not_muon():
    model = recipe_model(FEATURES)
    adamw, muon = model.setup_optimizers(embedding_lr=0.2)
    lm_head, embeddings, small = adamw.param_groups
    assert lm_head["params"] == [model.lm_head.weight]
    assert embeddings["params"] == [model.transformer.wte.weight, *model.value_embeds.parameters()]
    assert {id(p) for p in small["params"]} == {id(p) for p in model.gate_parameters() + model.scalar_parameters()}
    assert small["lr"] == small["initial_lr"] == SCALAR_LR and small["weight_decay"] == 0.0
    assert isinstance(muon, Muon)
    muon_params = [p for group in muon.param_groups for p in group["params"]]
    assert len(muon_params) == 6 * 3 and all(p.ndim == 2 for p in muon_params)
    covered = [id(p) for group in adamw.param_groups + muon.param_groups for p in group["params"]]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())


@pytest.mark.parametrize("features", CASES, ids=CASE_IDS)
def test_param_counts_add_up_and_lookups_cost_no_flops(features):
    model, today = GPT(GPTConfig(vocab_size=301, **SHAPE, **dict.fromkeys(features, True))), GPT(
        GPTConfig(vocab_size=301, **SHAPE))
    counts, today_counts = model.param_counts(), today.param_counts()
    assert counts["total"] == model.num_params() == sum(v for k, v in counts.items() if k != "total")
    assert counts["hidden_matrices"] == today_counts["hidden_matrices"] and counts["lm_head"] == today_counts["lm_head"]
    tables = sum(p.numel() for p in model.value_embeds.parameters())
    assert counts["embedding"] == today_counts["embedding"] + tables
    gates = sum(p.numel() for p in model.gate_parameters())
    assert counts["gates_and_scalars"] == gates + sum(p.numel() for p in model.scalar_parameters())
    assert model.estimate_flops() == today.estimate_flops() + 6 * gates  # tables and scalars: no matmul


@pytest.mark.parametrize("features", CASES, ids=CASE_IDS)
def test_a_fresh_model_with_the_feature_trains(features):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=301, **SHAPE, **dict.fromkeys(features, True)))
    model.init_weights()
    new = {name: p.detach().clone() for name, p in model.named_parameters()
           if name.endswith(("lambdas", "lambda", "gate")) or name.startswith("value_embeds")}
    optimizers = model.setup_optimizers()
    idx = tokens(4, 33, seed=6)
    losses = []
    for _ in range(8):
        loss = model(idx[:, :-1], idx[:, 1:])
        losses.append(loss.item())
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
    assert losses[0] > 5.0 and losses[-1] < 0.6 * losses[0], losses
    parameters = dict(model.named_parameters())
    assert new and all(not torch.equal(parameters[name], before) for name, before in new.items())  # all learn


def test_under_bf16_autocast_the_residual_stream_stays_bf16():
    """The new tables and scalars are fp32 parameters; none of them may promote the bf16 activations (CUDA training)
    back to fp32."""
    model = recipe_model(FEATURES)
    idx = tokens(2, 16, seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.hidden_states(idx)
        loss = model(idx, targets=idx)
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(loss)


# -----------------------------------------------------------------------------
# Decoding through the KV cache equals the plain forward


@pytest.mark.parametrize("features", DECODE_CASES, ids=DECODE_IDS)
def test_prefill_then_token_by_token_gives_the_full_forward_logits(features):
    model = recipe_model(features)
    idx = tokens(3, 24, seed=1)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(3, 48)
        steps = [model(idx[:, :9], kv_cache=cache), model(idx[:, 9:14], kv_cache=cache)]  # prefill, a chunk after
        steps += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(14, 24)]  # past the 16-token windows
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("features", DECODE_CASES, ids=DECODE_IDS)
def test_rows_at_different_positions_decode_like_full_forwards(features):
    """Row 0 is reset and starts a new prompt while row 1 continues its own: one forward, two positions."""
    model = recipe_model(features)
    first, fresh, continuation = tokens(2, 10, seed=2), tokens(1, 5, seed=3), tokens(1, 5, seed=4)
    with torch.no_grad():
        cache = model.new_kv_cache(2, 48)
        model(first, kv_cache=cache)
        cache.reset_row(0)
        logits = model(torch.cat([fresh, continuation]), kv_cache=cache)
        torch.testing.assert_close(logits[0], model(fresh)[0], atol=1e-5, rtol=1e-5)
        full = model(torch.cat([first[1:], continuation], dim=1))[0, 10:]
        torch.testing.assert_close(logits[1], full, atol=1e-5, rtol=1e-5)
        assert cache.pos.tolist() == [5, 15]


def test_smear_takes_the_previous_token_from_the_cache():
    """The cache's token ids are what a decode step smears in: forgetting them changes the next logits."""
    model = recipe_model(["smear"])
    idx = tokens(1, 12, seed=5)
    with torch.no_grad():
        full = model(idx)[0, -1]
        cache = model.new_kv_cache(1, 16)
        model(idx[:, :-1], kv_cache=cache)
        cache.tokens.zero_()
        forgetful = model(idx[:, -1:], kv_cache=cache)[0, -1]
    assert (forgetful - full).abs().max() > 1e-2


def test_copy_row_moves_smear_state_with_the_row():
    """As the scheduler does it: a prefilled row copied into another row of the same cache (an extra sample, or the
    last row moved into a retired row's hole), then both decode on."""
    model = recipe_model(EVERYTHING)
    other, prompt, continuation = tokens(1, 9, seed=7), tokens(1, 6, seed=8), tokens(2, 4, seed=9)
    with torch.no_grad():
        cache = model.new_kv_cache(3, 32)
        model(other, kv_cache=cache.rows(1, 2))
        model(prompt, kv_cache=cache.rows(2, 3))
        cache.copy_row(cache, 2, 0)
        logits = model(continuation, kv_cache=cache.rows(0, 2))  # row 0: the copy, row 1: the other prompt
        for row, start in enumerate((prompt, other)):
            expected = model(torch.cat([start, continuation[row:row + 1]], dim=1))[0, start.size(1):]
            torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=1e-5)
    assert cache.pos.tolist() == [10, 13, 6]


def greedy_by_full_forwards(model: GPT, prompt: list[int], max_tokens: int) -> list[int]:
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    return sequence[len(prompt):]


def chat_model(tokenizer) -> GPT:
    """Every change on, over the tokenizer's vocab; the special tokens' logits pinned at 0, below the best of
    ~500 random ones, so greedy replies run to max_tokens instead of ending at a random <|assistant_end|>."""
    model = recipe_model(EVERYTHING, vocab_size=tokenizer.get_vocab_size())
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5)
        model.lm_head.weight[[tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()]] = 0.0
    return model


def test_engine_samples_decode_like_full_forwards(tiny_tokenizer):
    model = chat_model(tiny_tokenizer)
    prompt = tiny_tokenizer.render_for_completion({"messages": [{"role": "user", "content": "Why is the sky blue?"}]})
    samples, _ = Engine(model, tiny_tokenizer).generate_batch(prompt, num_samples=2, max_tokens=10, temperature=0.0)
    expected = greedy_by_full_forwards(model, prompt, 10)
    assert [sample[len(prompt):] for sample in samples] == [expected, expected]


def test_continuous_batching_decodes_like_full_forwards(tiny_tokenizer):
    """Prompts of different lengths prefilled together (right-padded, positions set back), n=2 copied rows, and rows
    retiring at different steps (the last row moved into the hole): every reply is the full-forward greedy one."""
    model = chat_model(tiny_tokenizer)
    questions = [("hi", 9, 1), ("What is the capital of France, and why?", 4, 2), ("2+2?", 7, 1)]
    prompts = [tiny_tokenizer.render_for_completion({"messages": [{"role": "user", "content": q}]})
               for q, _, _ in questions]
    scheduler = Scheduler(Engine(model, tiny_tokenizer), max_batch_size=4)
    # submitted before the thread starts, so all three are admitted together, in one padded prefill
    requests = [scheduler.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, n=n))
                for prompt, (_, max_tokens, n) in zip(prompts, questions)]
    scheduler.start()
    try:
        replies = [scheduler_replies(request) for request in requests]
    finally:
        scheduler.stop()
    assert scheduler.counters["prefill_passes"] == 1
    for prompt, (_, max_tokens, n), reply in zip(prompts, questions, replies):
        assert reply == [greedy_by_full_forwards(model, prompt, max_tokens)] * n


def scheduler_replies(request) -> list[list[int]]:
    replies: dict[int, list[int]] = {}
    for event in request:
        if event.token is not None:
            replies.setdefault(event.sample, []).append(event.token)
    return [replies[index] for index in sorted(replies)]


# -----------------------------------------------------------------------------
# Checkpoints, exports, base_train


def test_a_meta_with_the_fields_rebuilds_the_model_with_them():
    model = recipe_model(EVERYTHING)
    meta = json.loads(json.dumps({"model_config": asdict(model.config)}))  # as a meta file holds it
    rebuilt = build_model(meta, "cpu", "eval", model.state_dict())
    idx = tokens(2, 12, seed=10)
    with torch.no_grad():
        assert torch.equal(rebuilt(idx), model(idx))


@pytest.mark.parametrize("feature", EVERYTHING)
def test_the_hf_export_refuses_the_feature_by_name_and_the_c_export_takes_it(feature, tiny_tokenizer):
    """transformers' NanoChat has no setting for any of them; runc/run.c runs them all (tests/test_runc.py)."""
    model = GPT(GPTConfig(vocab_size=tiny_tokenizer.get_vocab_size(), **SHAPE, **config_settings([feature])))
    value = re.escape(repr(config_settings([feature])[feature]))
    with pytest.raises(ExportError, match=rf"GPTConfig\.{feature}={value} has no counterpart"):
        check_exportable(model, tiny_tokenizer)
    check_c_exportable(model, tiny_tokenizer, {}, 0)


RECIPE_FLAGS = ["--value-embeddings", "--layer-scalars", "--smear", "--backout", "--window-pattern=SL", "--qk-gain=1.2",
                "--vocab-multiple=64", "--init=uniform"]
TRAIN_FLAGS = ["--depth=2", "--max-seq-len=64", "--device-batch-size=2", "--total-batch-size=128",
               "--num-iterations=4", "--eval-every=-1", "--eval-tokens=128", "--sample-every=-1"]


def test_base_train_trains_with_the_flags_and_refuses_a_resume_without_them(base_dir, tiny_tokenizer):
    tiny_tokenizer.save(base_dir / "tokenizer")
    torch.save(torch.tensor(tiny_tokenizer.token_byte_lengths()), base_dir / "tokenizer" / "token_bytes.pt")
    assert base_train.main([*TRAIN_FLAGS, *RECIPE_FLAGS]) == 0
    meta = json.loads((base_dir / "base_checkpoints" / "d2" / "meta_000004.json").read_text())
    assert all(meta["model_config"][feature] and meta["user_config"][feature] for feature in FEATURES)
    assert {name: meta["model_config"][name] for name in ATTENTION_SETTINGS} == {
        "window_pattern": "SL", "qk_gain": 1.2, "vocab_multiple": 64}
    assert meta["user_config"]["init"] == "uniform"
    with pytest.raises(SystemExit, match=r"--smear: saved True, now False"):
        base_train.main([*TRAIN_FLAGS, "--resume", *[flag for flag in RECIPE_FLAGS if flag != "--smear"]])


@pytest.mark.parametrize("flag, message", [("--window-pattern=SXL", "--window-pattern must be letters S"),
                                           ("--qk-gain=0", "--qk-gain must be positive"),
                                           ("--vocab-multiple=0", "--vocab-multiple must be a positive integer"),
                                           ("--init=xavier", "invalid choice: 'xavier'")])
def test_base_train_refuses_a_bad_recipe_flag(flag, message, capsys):
    with pytest.raises(SystemExit):
        base_train.parse_args([*TRAIN_FLAGS, flag])
    assert message in capsys.readouterr().err


def test_a_run_saved_before_the_flags_existed_resumes_with_them_off():
    args = base_train.parse_args(TRAIN_FLAGS)
    saved = {name: value for name, value in vars(args).items() if name not in FEATURES}  # an older run's meta
    check_same_run(args, {"user_config": saved}, base_train.RUN_DEFINING_FLAGS, "meta.json")
    with pytest.raises(RunError, match=r"--backout: saved False, now True"):
        check_same_run(base_train.parse_args([*TRAIN_FLAGS, "--backout"]), {"user_config": saved},
                       base_train.RUN_DEFINING_FLAGS, "meta.json")


# -----------------------------------------------------------------------------
# Sliding windows, the QK gain, vocabulary padding, the uniform init


def test_the_window_pattern_repeats_over_the_layers_and_the_last_layer_sees_everything():
    config = GPTConfig(vocab_size=301, sequence_len=64, n_layer=6, n_head=4, n_kv_head=4, n_embd=64,
                       window_pattern="SSL")
    assert [attention_window(config, i) for i in range(6)] == [16, 16, None, 16, 16, None]
    assert attention_window(GPTConfig(n_layer=2, window_pattern="S"), 1) is None
    for bad in ("", "SXL", "ssl"):
        with pytest.raises(ValueError, match="window_pattern"):
            GPTConfig(window_pattern=bad)


def reference_attention(block, x: torch.Tensor, cos, sin, window: int | None, gain: float) -> torch.Tensor:
    """Attention written out position by position: softmax over the keys each query may see, at gain/sqrt(d)."""
    attn = block.attn
    B, T, _ = x.shape
    q = attn.c_q(x).view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)
    k = attn.c_k(x).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
    v = attn.c_v(x).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
    q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
    repeat = attn.n_head // attn.n_kv_head
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    out = torch.zeros_like(q)
    for t in range(T):
        first = 0 if window is None else max(0, t - window + 1)
        scores = q[:, :, t:t + 1] @ k[:, :, first:t + 1].mT * gain / math.sqrt(attn.head_dim)
        out[:, :, t] = (scores.softmax(-1) @ v[:, :, first:t + 1])[:, :, 0]
    return attn.c_proj(out.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("through_flex", [False, True], ids=["sdpa_masks", "flex_attention"])
@pytest.mark.parametrize("window_pattern, qk_gain", [("SSL", 1.0), ("L", 1.3), ("SSL", 0.7)])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_attention_matches_a_softmax_over_the_window_written_out(window_pattern, qk_gain, through_flex, monkeypatch):
    """Both window paths: SDPA masks (CPU, MPS) and flex_attention's block mask (CUDA training; forward only here,
    its backward has no CPU kernel), GQA included."""
    flex_calls = []
    if through_flex:
        monkeypatch.setattr(attention, "flex_windows", lambda device: True)
        flex = attention.flex_attention
        monkeypatch.setattr(attention, "flex_attention", lambda *a, **kw: flex_calls.append(1) or flex(*a, **kw))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=301, **SHAPE, window_pattern=window_pattern, qk_gain=qk_gain))
    model.init_weights()
    x = torch.randn(2, 40, 64)
    T = x.size(1)
    cos, sin = model.cos[None, None, :T], model.sin[None, None, :T]
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            torch.nn.init.normal_(block.attn.c_proj.weight, std=0.2)
            window = attention_window(model.config, i)
            expected = reference_attention(block, x, cos, sin, window, qk_gain)
            got = block.attn(x, None, cos, sin, None, None, T, None)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert window_pattern == "L" or attention_window(model.config, 0) == 16 < T  # the window really cut
    assert len(flex_calls) == (2 if through_flex and window_pattern == "SSL" else 0)  # the two windowed layers


def test_windows_take_flex_attention_only_on_cuda_when_training_or_compiled():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert attention.flex_windows(cuda) and not attention.flex_windows(cpu)
    with torch.no_grad():
        assert not attention.flex_windows(cuda)  # eager inference: SDPA's fused masked kernel


def test_a_window_hides_tokens_further_back_than_its_reach():
    """One windowed layer under a full one: a token more than the window back reaches a query only through the full
    layer, so with the full layer's attention output zeroed, changing it leaves that query's logits alone."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=301, sequence_len=64, n_layer=2, n_head=4, n_kv_head=4, n_embd=64,
                       window_pattern="S")
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight.normal_(std=0.3)
        model.lm_head.weight.normal_(std=0.3)
        idx = tokens(1, 40, seed=12)
        changed = idx.clone()
        changed[0, 5] = (idx[0, 5] + 1) % 301
        before, after = model(idx), model(changed)
    assert torch.equal(before[0, 5 + 16:], after[0, 5 + 16:])  # window 16: position 21 sees 6..21
    assert not torch.equal(before[0, 5:5 + 16], after[0, 5:5 + 16])


def test_padding_rows_have_no_logit_and_no_gradient():
    model = recipe_model(["vocab_multiple"])
    assert model.transformer.wte.weight.size(0) == model.lm_head.weight.size(0) == 320
    idx = tokens(2, 12, seed=13)
    with torch.no_grad():
        assert model(idx).shape == (2, 12, 301)
    model.train()
    model(idx[:, :-1], idx[:, 1:]).backward()
    head_grad = model.lm_head.weight.grad
    assert head_grad[:301].abs().sum() > 0 and torch.count_nonzero(head_grad[301:]) == 0


def test_the_uniform_init_has_the_normal_inits_std_with_a_smaller_mlp_input_and_embedding():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=301, **SHAPE, value_embeddings=True))
    model.init_weights("uniform")
    block = model.transformer.h[0]
    bound = 3 ** 0.5 * 64 ** -0.5
    assert block.attn.c_q.weight.abs().max() <= bound and block.attn.c_q.weight.abs().max() > 0.95 * bound
    assert block.attn.c_q.weight.std().item() == pytest.approx(64 ** -0.5, rel=0.05)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.5 * 64 ** -0.5, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.5, rel=0.05)
    assert model.value_embeds["0"].weight.std().item() == pytest.approx(0.5, rel=0.05)
    assert torch.count_nonzero(block.attn.c_proj.weight) == 0
    with pytest.raises(ValueError, match="init scheme must be one of normal, uniform"):
        model.init_weights("xavier")
