"""The Engine: KV-cache decoding, sampling, tool use and UTF-8 streaming."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.engine import Engine, TextStream, prepare_for_serving, run_python_tool
from nanochat.kernels import PackedLinear
from nanochat.sampling import sample_next_tokens


def chat_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.render_for_completion({"messages": [{"role": "user", "content": text}]})


# -----------------------------------------------------------------------------
# Decoding with the KV cache


def test_greedy_with_kv_cache_equals_full_recompute(either_tiny_gpt, tiny_tokenizer):
    prompt = chat_prompt(tiny_tokenizer, "Why is the sky blue?")
    results, masks = Engine(either_tiny_gpt, tiny_tokenizer).generate_batch(prompt, max_tokens=30, temperature=0.0)

    expected = list(prompt)
    with torch.no_grad():
        for _ in range(30):  # no cache: the whole sequence through the model at every step
            logits = either_tiny_gpt(torch.tensor([expected]))[0, -1]
            expected.append(int(logits.argmax()))
    assert results[0] == expected
    assert masks[0] == [0] * len(prompt) + [1] * 30


@pytest.mark.skipif(not PackedLinear.available(torch.device("cpu")), reason="this torch has no oneDNN")
def test_served_on_cpu_every_linear_is_packed_and_computes_what_it_did(tiny_gpt, served_tiny_gpt):
    assert not any(isinstance(m, torch.nn.Linear) for m in served_tiny_gpt.modules())
    assert sum(isinstance(m, PackedLinear) for m in served_tiny_gpt.modules()) == 6 * 2 + 1  # 6 per block + head
    tokens = torch.randint(0, tiny_gpt.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, served = tiny_gpt(tokens), served_tiny_gpt(tokens)
    assert served.shape == expected.shape
    torch.testing.assert_close(served, expected, rtol=1e-4, atol=1e-4)  # fp32 rounding, summed in another order


@pytest.mark.skipif(not PackedLinear.available(torch.device("cpu")), reason="this torch has no oneDNN")
def test_packed_linear_takes_any_leading_shape_and_refuses_a_bias():
    linear = torch.nn.Linear(48, 80, bias=False)
    packed = PackedLinear(linear)
    for shape in [(1, 48), (16, 48), (2, 5, 48), (4, 1, 48)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bias-free"):
        PackedLinear(torch.nn.Linear(4, 4))


def test_served_in_bf16_the_engine_decodes_what_the_fp32_model_would(tiny_gpt, tiny_tokenizer, monkeypatch):
    """prepare_for_serving under NANOCHAT_DTYPE=bfloat16: weights and KV cache in bf16, and every greedy token is
    (within bf16 rounding) the fp32 model's best next token for the same context."""
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    served = prepare_for_serving(copy.deepcopy(tiny_gpt))
    engine = Engine(served, tiny_tokenizer)
    assert {p.dtype for p in served.parameters()} == {torch.bfloat16}
    assert served.new_kv_cache(1, 8).k.dtype == torch.bfloat16
    prompt = chat_prompt(tiny_tokenizer, "Why is the sky blue?")
    tokens = engine.generate_batch(prompt, max_tokens=20, temperature=0.0)[0][0]
    assert len(tokens) == len(prompt) + 20
    with torch.no_grad():
        logits = tiny_gpt(torch.tensor([tokens[:-1]]))[0, len(prompt) - 1:]  # fp32, each generated position
    chosen = logits.gather(1, torch.tensor(tokens[len(prompt):])[:, None]).squeeze(1)
    assert (chosen >= logits.max(dim=1).values - 0.05).all(), (logits.max(dim=1).values - chosen)


def test_greedy_samples_from_one_prefill_are_identical(either_tiny_gpt, tiny_tokenizer):
    prompt = chat_prompt(tiny_tokenizer, "hello")
    results, _ = Engine(either_tiny_gpt, tiny_tokenizer).generate_batch(prompt, num_samples=3, max_tokens=12,
                                                                  temperature=0.0)
    alone, _ = Engine(either_tiny_gpt, tiny_tokenizer).generate_batch(prompt, max_tokens=12, temperature=0.0)
    assert results == alone * 3


def test_seed_reproduces_samples_and_samples_in_a_batch_differ(tiny_gpt, tiny_tokenizer):
    engine = Engine(tiny_gpt, tiny_tokenizer)
    prompt = chat_prompt(tiny_tokenizer, "Tell me a story")
    first, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=7)
    again, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=7)
    other, _ = engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=8)
    assert first == again
    assert first != other
    completions = [tuple(sample[len(prompt):]) for sample in first]
    assert len(set(completions)) == 4  # every row draws its own randomness
    fewer, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=16, temperature=1.0, seed=7)
    assert fewer == first[:2]  # sample i depends on (seed, i) only, not on how many samples share the batch


def test_generate_streams_one_column_per_step(tiny_gpt, tiny_tokenizer):
    prompt = chat_prompt(tiny_tokenizer, "count")
    columns = list(Engine(tiny_gpt, tiny_tokenizer).generate(prompt, num_samples=2, max_tokens=5, temperature=0.0))
    assert len(columns) == 5
    assert all(len(tokens) == 2 and masks == [1, 1] for tokens, masks in columns)


# -----------------------------------------------------------------------------
# The sampler


def test_sampler_keeps_to_top_k_and_top_p_per_row():
    torch.manual_seed(0)
    logits = torch.randn(1, 50).repeat(4, 1) * 3
    order = logits[0].argsort(descending=True).tolist()
    probs = torch.softmax(logits[0], dim=-1)[order]
    nucleus = int((probs.cumsum(0) - probs < 0.5).sum())  # tokens kept by top_p=0.5
    temperature = torch.tensor([1.0, 1.0, 0.0, 1.0])
    top_k = torch.tensor([3, 0, 0, 0])
    top_p = torch.tensor([1.0, 0.5, 1.0, 1.0])
    seen = [set() for _ in range(4)]
    generator = torch.Generator().manual_seed(0)
    for _ in range(400):
        tokens = sample_next_tokens(logits, temperature, top_k, top_p, torch.rand(4, generator=generator))
        for row, token in enumerate(tokens.tolist()):
            seen[row].add(token)
    assert seen[0] == set(order[:3])  # top-k: exactly the 3 best, all of them reached
    assert seen[1] == set(order[:nucleus])  # top-p: the nucleus
    assert seen[2] == {order[0]}  # temperature 0: greedy
    assert len(seen[3]) > nucleus  # unfiltered row in the same batch: wider


def test_sampler_follows_the_softmax_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    uniforms = (torch.arange(1000) + 0.5) / 1000  # evenly spread: the inverse CDF should split them 500/300/200
    tokens = torch.cat([sample_next_tokens(logits, torch.tensor([1.0]), torch.tensor([0]), torch.tensor([1.0]),
                                           u[None]) for u in uniforms])
    assert torch.bincount(tokens, minlength=3).tolist() == [500, 300, 200]


@pytest.mark.parametrize("top_k", [None, 20])
def test_gpt_generate_samples_what_a_one_sample_engine_request_samples(tiny_gpt, tiny_tokenizer, top_k):
    """The plain loop training scripts print samples with and the Engine draw from one sampler, with the same
    per-sample generator for a seed: a one-sample request gets the same tokens from either."""
    prompt = chat_prompt(tiny_tokenizer, "Tell me a story")
    plain = list(tiny_gpt.generate(prompt, max_tokens=24, temperature=0.8, top_k=top_k, seed=5))
    results, _ = Engine(tiny_gpt, tiny_tokenizer).generate_batch(prompt, max_tokens=24, temperature=0.8, top_k=top_k,
                                                               seed=5)
    assert results[0][len(prompt):] == plain
    assert len(plain) == 24  # the Engine ran to max_tokens too: no stop token cut its sample short
    assert plain != list(tiny_gpt.generate(prompt, max_tokens=24, temperature=0))  # really sampled, not greedy


# -----------------------------------------------------------------------------
# Tool use on a scripted model


def test_python_tool_call_output_is_forced_into_the_stream(scripted_gpt, tiny_tokenizer):
    special = tiny_tokenizer.encode_special
    prompt = chat_prompt(tiny_tokenizer, "What is 6 times 7?")
    output = tiny_tokenizer.encode("42")
    call = [special("<|python_start|>"), *tiny_tokenizer.encode("6*7"), special("<|python_end|>")]
    answer = tiny_tokenizer.encode(" The answer is 42.")
    filler = [0] * (len(output) + 2)  # what the model "would" say while the tool output is forced
    model = scripted_gpt(len(prompt), call + filler + answer + [special("<|assistant_end|>")])

    results, masks = Engine(model, tiny_tokenizer).generate_batch(prompt, max_tokens=100, temperature=0.0)

    forced = [special("<|output_start|>"), *output, special("<|output_end|>")]
    assert results[0] == prompt + call + forced + answer
    assert masks[0] == [0] * len(prompt) + [1] * len(call) + [0] * len(forced) + [1] * len(answer)


def test_python_tool_reports_errors_and_runs_programs():
    assert run_python_tool("1/0").startswith("Error: ZeroDivisionError")
    assert run_python_tool("x = 3\nprint(x * 5)") == "15"
    assert run_python_tool("2**10") == "1024"  # a bare expression prints its value


def test_generation_stops_at_assistant_end_and_bos(scripted_gpt, tiny_tokenizer):
    special = tiny_tokenizer.encode_special
    prompt = chat_prompt(tiny_tokenizer, "hi")
    text = tiny_tokenizer.encode("Hello there")
    for stop in ("<|assistant_end|>", "<|bos|>"):
        model = scripted_gpt(len(prompt), text + [special(stop)] + text)
        results, _ = Engine(model, tiny_tokenizer).generate_batch(prompt, max_tokens=50, temperature=0.0)
        assert results[0] == prompt + text


def test_generation_stops_at_max_tokens(tiny_gpt, tiny_tokenizer):
    prompt = chat_prompt(tiny_tokenizer, "hi")
    results, _ = Engine(tiny_gpt, tiny_tokenizer).generate_batch(prompt, max_tokens=7, temperature=0.0)
    assert len(results[0]) == len(prompt) + 7


def test_empty_prompt_is_rejected(tiny_gpt, tiny_tokenizer):
    with pytest.raises(ValueError, match="at least one prompt token"):
        Engine(tiny_gpt, tiny_tokenizer).generate_batch([], max_tokens=3)


# -----------------------------------------------------------------------------
# Streaming text


def test_text_stream_emits_only_complete_utf8_characters(tiny_tokenizer):
    text = "naïve café — 日本語の文章 🙂👍 done"
    tokens = tiny_tokenizer.encode(text)
    stream = TextStream(tiny_tokenizer)
    pieces = [stream.feed(token) for token in tokens]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in piece for piece in pieces)
    # a 4-byte emoji over a 512-token vocabulary is split across tokens: some tokens emit nothing yet
    assert any(piece == "" for piece in pieces)


def test_text_stream_turns_a_dangling_byte_into_a_replacement_character(tiny_tokenizer):
    stream = TextStream(tiny_tokenizer)
    first_byte_of_emoji = tiny_tokenizer.encode("🙂")[0]
    assert stream.feed(first_byte_of_emoji) == ""
    assert stream.flush() == "\ufffd"


def test_special_tokens_are_not_text(tiny_tokenizer):
    stream = TextStream(tiny_tokenizer)
    assert stream.feed(tiny_tokenizer.encode_special("<|assistant_end|>")) == ""


def test_engine_stream_decodes_multibyte_text_split_across_tokens(scripted_gpt, tiny_tokenizer):
    prompt = chat_prompt(tiny_tokenizer, "say it")
    reply = "Grüße 🙂 日本"
    model = scripted_gpt(len(prompt), tiny_tokenizer.encode(reply) + [tiny_tokenizer.encode_special("<|assistant_end|>")])
    stream, pieces = TextStream(tiny_tokenizer), []
    for column, _masks in Engine(model, tiny_tokenizer).generate(prompt, max_tokens=50, temperature=0.0):
        pieces.append(stream.feed(column[0]))
    assert "".join(pieces) == reply
    assert all("\ufffd" not in piece for piece in pieces)


# -----------------------------------------------------------------------------
# The terminal chat (scripts/chat_cli.py) over a saved checkpoint


@pytest.fixture
def sft_checkpoint(base_dir, tiny_gpt, tiny_tokenizer):
    from nanochat.checkpoint import model_meta, save_checkpoint

    tiny_tokenizer.save(base_dir / "tokenizer")
    save_checkpoint(base_dir / "chatsft_checkpoints" / "d2", 5, tiny_gpt.state_dict(), None,
                    model_meta(tiny_gpt.config, tiny_tokenizer, 5))
    return base_dir


def greedy_text(model, tokenizer, messages, max_tokens):
    prompt = tokenizer.render_for_completion({"messages": messages})
    tokens = Engine(model, tokenizer).generate_batch(prompt, max_tokens=max_tokens, temperature=0.0)[0][0]
    return tokenizer.decode(tokens[len(prompt):])


def test_chat_cli_one_shot_prints_the_answer_and_exits_0(sft_checkpoint, tiny_gpt, tiny_tokenizer):
    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "scripts.chat_cli", "-p", "Hello there", "--temperature", "0", "--max-tokens",
               "10", "--device-type", "cpu"]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=120, check=False,
                            env={**os.environ, "NANOCHAT_BASE_DIR": str(sft_checkpoint)})
    assert result.returncode == 0, result.stderr
    expected = greedy_text(tiny_gpt, tiny_tokenizer, [{"role": "user", "content": "Hello there"}], 10)
    assert result.stdout == expected + "\n"


def test_chat_cli_serves_int8_weights(sft_checkpoint, tiny_gpt, tiny_tokenizer, capsys):
    from nanochat.quantize import quantize_model
    from scripts import chat_cli

    assert chat_cli.main(["-p", "Hello there", "--temperature", "0", "--max-tokens", "10", "--device-type", "cpu",
                          "--quantize", "int8"]) == 0
    expected = greedy_text(quantize_model(copy.deepcopy(tiny_gpt), "int8"), tiny_tokenizer,
                           [{"role": "user", "content": "Hello there"}], 10)
    assert capsys.readouterr().out == expected + "\n"


def test_chat_cli_keeps_history_and_clears_it(sft_checkpoint, tiny_gpt, tiny_tokenizer, monkeypatch, capsys):
    from scripts import chat_cli

    lines = iter(["Hello", "How are you?", "/clear", "How are you?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert chat_cli.main(["--temperature", "0", "--max-tokens", "6", "--device-type", "cpu"]) == 0
    out = capsys.readouterr().out
    first = greedy_text(tiny_gpt, tiny_tokenizer, [{"role": "user", "content": "Hello"}], 6)
    with_history = greedy_text(tiny_gpt, tiny_tokenizer, [{"role": "user", "content": "Hello"},
                                                          {"role": "assistant", "content": first},
                                                          {"role": "user", "content": "How are you?"}], 6)
    fresh = greedy_text(tiny_gpt, tiny_tokenizer, [{"role": "user", "content": "How are you?"}], 6)
    replies = [line.removeprefix("nanochat: ") for line in out.splitlines() if line.startswith("nanochat: ")]
    assert replies == [first, with_history, fresh]
    assert "(conversation cleared)" in out


def test_chat_cli_streams_tool_calls_and_their_output(scripted_gpt, tiny_tokenizer):
    import argparse
    import io

    from scripts.chat_cli import stream_reply

    special = tiny_tokenizer.encode_special
    messages = [{"role": "user", "content": "What is 6 times 7?"}]
    prompt = tiny_tokenizer.render_for_completion({"messages": messages})
    call = [special("<|python_start|>"), *tiny_tokenizer.encode("6*7"), special("<|python_end|>")]
    answer = tiny_tokenizer.encode("It is 42.")
    script = call + [0] * (len(tiny_tokenizer.encode("42")) + 2) + answer + [special("<|assistant_end|>")]
    engine = Engine(scripted_gpt(len(prompt), script), tiny_tokenizer)
    out = io.StringIO()
    args = argparse.Namespace(max_tokens=60, temperature=0.0, top_k=0, seed=None)
    parts = stream_reply(engine, messages, args, out=out)
    assert parts == [{"type": "python", "text": "6*7"}, {"type": "python_output", "text": "42"},
                     {"type": "text", "text": "It is 42."}]
    assert out.getvalue() == "\n[python] 6*7\n -> 42\nIt is 42.\n"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_packing_probe_says_what_this_cpu_does(dtype):
    """PackedLinear.available is an honest probe: where it says yes the layer packs and computes; where it says no,
    packing really fails here (bf16 on AVX2-only CPUs) and prepare_for_serving keeps the plain layers."""
    linear = torch.nn.Linear(48, 80, bias=False).to(dtype)
    if PackedLinear.available(torch.device("cpu"), dtype):
        x = torch.randn(5, 48).to(dtype)
        with torch.inference_mode():
            torch.testing.assert_close(PackedLinear(linear)(x).float(), linear(x).float(), rtol=5e-2, atol=5e-2)
    elif torch.backends.mkldnn.is_available():
        with pytest.raises(RuntimeError):
            PackedLinear(linear)


def test_without_a_kernel_sandbox_served_tool_calls_are_refused_unless_the_operator_opts_out(monkeypatch, capsys):
    from nanochat import execution

    missing = execution.Confinement(False, "bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
    monkeypatch.setattr(execution, "confinement", lambda: missing)
    refused = run_python_tool("2**10")
    assert refused.startswith("Error: the python tool is disabled here") and "apt-get install bubblewrap" in refused
    assert run_python_tool("2**10", require_confinement=False) == "1024"  # evaluation's weaker layers
    assert execution.served_tool_requires_confinement(allow_unconfined=False) is True
    assert "DISABLED" in capsys.readouterr().err
    assert execution.served_tool_requires_confinement(allow_unconfined=True) is False
    assert "WITHOUT the kernel sandbox" in capsys.readouterr().err
