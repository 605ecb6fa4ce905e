"""Decode throughput of our Engine next to Hugging Face transformers' generate() on a LlamaForCausalLM of the same shape.

    python -m bench.engine                          # CPU defaults: depth 4, vocab 8192, batch 1 and 16
    python -m bench.engine --depth 12 --new-tokens 256 --batch-sizes 1 16 64 --dtype bfloat16   # on a GPU
    python -m bench.engine --quantize int8          # ours with int8 weights

Both decode greedily from the same random prompt replicated `batch` times, `new_tokens` tokens per row, with a KV
cache in the same --dtype, eager PyTorch (no torch.compile), in the same process, alternating measurement rounds.
Ours: one prefill at batch 1, its cache copied to every row (Engine.generate's num_samples). Llama: generate() on the
batch with min_new_tokens = max_new_tokens so it never stops early. tokens/s = batch * generated tokens / wall time
(prefill included for both). "Same shape" is bench/train.py's: equal depth, width, heads, vocab, untied embeddings,
and a SwiGLU MLP of 8/3 x width.

transformers is not a project dependency: `.venv/bin/pip install transformers` to run this.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from nanochat.common import autodetect_device_type
from nanochat.engine import Engine, prepare_for_serving
from nanochat.gpt import GPT, model_config_from_depth
from nanochat.kernels import describe_machine
from nanochat.quantize import QUANTIZATIONS, weight_bytes
from nanochat.tokenizer import Tokenizer


def byte_level_tokenizer_with_vocab(vocab_size: int) -> Tokenizer:
    """A tokenizer whose vocabulary matches the model's: the engine only needs the special token ids, and the
    bench never decodes text, so the merges are placeholder byte strings."""
    ranks = {bytes([i]): i for i in range(256)}
    for rank in range(256, vocab_size - 9):
        ranks[b"\xff" + rank.to_bytes(4, "big")] = rank  # never produced by encoding; only their ids matter here
    return Tokenizer(ranks)


def build_models(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = model_config_from_depth(args.depth, args.vocab_size, args.prompt_len + args.new_tokens)
    with torch.device(device):
        ours = GPT(config)
    ours.init_weights()
    intermediate = (8 * config.n_embd // 3) // 8 * 8
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=intermediate,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.sequence_len, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        attn_implementation="sdpa")
    with torch.device(device):
        llama = LlamaForCausalLM(llama_config)
    return ours.eval(), llama.eval()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(engine: Engine, prompt: list[int], batch: int, new_tokens: int, device) -> tuple[float, int]:
    sync(device)
    start = time.perf_counter()
    steps = sum(1 for _ in engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=0.0))
    sync(device)
    return time.perf_counter() - start, steps * batch


@torch.inference_mode()
def time_llama(llama, prompt: list[int], batch: int, new_tokens: int, device) -> tuple[float, int]:
    input_ids = torch.tensor([prompt] * batch, device=device)
    sync(device)
    start = time.perf_counter()
    out = llama.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)
    sync(device)
    return time.perf_counter() - start, (out.size(1) - len(prompt)) * batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (median reported)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="both models' weights and KV caches (chat_cli/chat_web serve in the compute dtype: bf16 "
                             "on recent GPUs, fp32 on CPU unless NANOCHAT_DTYPE=bfloat16)")
    parser.add_argument("--quantize", default="none", choices=QUANTIZATIONS,
                        help="ours with int8 weights (groups of 64), as chat_cli --quantize int8 serves it; the "
                             "peer stays in --dtype")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice); on a "
                        "shared machine 1 avoids OpenMP threads waiting on each other")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        import transformers
    except ImportError:
        print("bench/engine.py compares against Hugging Face transformers, which is not installed (it is not a "
              "project dependency): run `.venv/bin/pip install transformers` and retry", file=sys.stderr)
        return 1
    transformers.logging.set_verbosity_error()

    device = torch.device(args.device_type or autodetect_device_type())
    torch.manual_seed(0)
    ours, llama = build_models(args, device)
    dtype = getattr(torch, args.dtype)
    ours_bytes = weight_bytes(ours.to(dtype))
    ours = prepare_for_serving(ours, dtype, quantization=args.quantize)  # ours as chat_cli/chat_web serve it
    llama = llama.to(dtype)
    engine = Engine(ours, byte_level_tokenizer_with_vocab(args.vocab_size))
    # a prompt without special tokens, and greedy decoding of a fresh model never hits one either (checked below)
    prompt = torch.randint(0, 256, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    c = ours.config
    print(describe_machine(device))
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {args.dtype}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    print(f"shape: depth {c.n_layer}, width {c.n_embd}, heads {c.n_head}, vocab {c.vocab_size}; "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per row, greedy")
    if args.quantize != "none":
        print(f"ours {args.quantize}: weights {weight_bytes(ours) / 2**20:.1f} MiB, {args.dtype}: "
              f"{ours_bytes / 2**20:.1f} MiB")

    for batch in args.batch_sizes:
        time_ours(engine, prompt, batch, 4, device)  # warm-up
        time_llama(llama, prompt, batch, 4, device)
        rates: dict[str, list[float]] = {"ours": [], "llama": []}
        for _ in range(args.rounds):
            for name, timer, model in (("ours", time_ours, engine), ("llama", time_llama, llama)):
                seconds, tokens = timer(model, prompt, batch, args.new_tokens, device)
                if tokens != batch * args.new_tokens:
                    print(f"warning: {name} generated {tokens} tokens, not {batch * args.new_tokens}")
                rates[name].append(tokens / seconds)
        ours_rate, llama_rate = statistics.median(rates["ours"]), statistics.median(rates["llama"])
        ours_best, llama_best = max(rates["ours"]), max(rates["llama"])
        print(f"batch {batch:>3}: median ours {ours_rate:>8,.0f} tok/s  llama generate() {llama_rate:>8,.0f} tok/s  "
              f"ratio {ours_rate / llama_rate:.2f}x | best-of-{args.rounds} ratio {ours_best / llama_best:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
