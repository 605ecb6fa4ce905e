"""Training-step throughput of our GPT next to Hugging Face transformers' LlamaForCausalLM of the same shape.

    python -m bench.train                                  # CPU defaults: depth 4, 8 x 256 tokens, vocab 8192
    python -m bench.train --depth 20 --batch-size 8 --seq-len 2048 --vocab-size 65536    # a GPU: MFU, memory

(On a GPU both models run eager, so they need far more memory than compiled training: at --batch-size 32 they ran
out of an H200's 140 GB.)

A training step is forward + backward over --grad-accum micro-batches of (batch, seq) tokens, then one optimizer step:
ours with its own optimizers (Muon + AdamW), Llama with fused AdamW. Both forward/backward and optimizer time are
reported, because Muon's Newton-Schulz iterations cost a fixed amount per step: at a few thousand tokens per step (the
defaults) they are a visible share, at the 0.5M tokens per step of real training they vanish.

"Same shape" means equal depth, width, heads, vocab and context, no biases, untied embeddings, and a SwiGLU MLP whose
hidden size (8/3 * width, rounded down to a multiple of 8) gives Llama the same MLP parameter count and FLOPs as our
4x ReLU² MLP (Llama's own sizing rule; --llama-mlp-ratio 4 gives it our hidden width instead, i.e. 1.5x our MLP).
Both run eager (no torch.compile) in fp32 on CPU, bf16 autocast on a GPU, in the same process on the same data,
alternating measurement rounds so that neither gets a quieter machine; the median round is reported.

transformers is not a project dependency: `.venv/bin/pip install transformers` to run this.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from nanochat.common import autodetect_device_type, get_compute_dtype, keep_freed_memory
from nanochat.gpt import GPT, model_config_from_depth, peak_flops
from nanochat.kernels import describe_machine


def build_ours(args, device):
    config = model_config_from_depth(args.depth, args.vocab_size, args.seq_len)
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    optimizers = model.setup_optimizers()

    def forward_backward(x, y):
        (model(x, y) / args.grad_accum).backward()

    def optimizer_step():
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    return model, forward_backward, optimizer_step, model.estimate_flops()


def build_llama(args, device, config):
    from transformers import LlamaConfig, LlamaForCausalLM

    intermediate = round(args.llama_mlp_ratio * config.n_embd) // 8 * 8
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=intermediate,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
        max_position_embeddings=config.sequence_len, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        attn_implementation="sdpa", use_cache=False)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type in ("cuda", "cpu"))

    def forward_backward(x, y):
        (model(input_ids=x, labels=y).loss / args.grad_accum).backward()  # HF shifts the labels itself: y = x

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    non_embedding = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    flops = 6 * non_embedding + 12 * config.n_layer * config.n_embd * config.sequence_len
    return model, forward_backward, optimizer_step, flops


def time_step(forward_backward, optimizer_step, batches, device, autocast, clock) -> tuple[float, float]:
    """(forward/backward seconds, optimizer seconds) of one training step over `batches` (the micro-batches)."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = clock()
    for x, y in batches:
        with autocast:
            forward_backward(x, y)
    synchronize()
    middle = clock()
    optimizer_step()
    synchronize()
    return middle - start, clock() - middle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    parser.add_argument("--llama-mlp-ratio", type=float, default=8 / 3, help="Llama MLP hidden size / width")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time: with --threads 1 on a CPU shared with other "
                             "jobs, CPU time measures the work without the time spent waiting for a core")
    parser.add_argument("--device-type", default="", help="cuda|cpu|mps (default: autodetect)")
    args = parser.parse_args(argv)
    for flag in ("depth", "batch_size", "seq_len", "vocab_size", "grad_accum", "steps", "rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")

    try:
        import transformers
    except ImportError:
        print("bench/train.py compares against Hugging Face transformers, which is not installed (it is not a "
              "project dependency): run `.venv/bin/pip install transformers` and retry", file=sys.stderr)
        return 1

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device_type or autodetect_device_type())
    if device.type == "cpu":
        keep_freed_memory()  # as compute_init does for our training scripts; both models share the process
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu only measures CPU work: use it with --device-type cpu")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    dtype = get_compute_dtype(device.type)
    autocast = torch.amp.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    torch.manual_seed(0)
    ours = build_ours(args, device)
    llama = build_llama(args, device, ours[0].config)
    models = {"ours": ours, "llama": llama}
    c = ours[0].config
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    print(describe_machine(device))
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"dtype {dtype}, threads {torch.get_num_threads()}, {args.clock} clock, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"shape: depth {c.n_layer}, width {c.n_embd}, heads {c.n_head}, vocab {c.vocab_size}, context "
          f"{c.sequence_len}; step = {args.grad_accum} x {args.batch_size} x {args.seq_len} = {tokens_per_step} tokens")
    print(f"params: ours {ours[0].num_params():,}, llama {sum(p.numel() for p in llama[0].parameters()):,}; "
          f"training FLOPs/token: ours {ours[3]:.3e}, llama {llama[3]:.3e}")

    data = torch.randint(0, c.vocab_size, (args.grad_accum, args.batch_size, args.seq_len + 1),
                         generator=torch.Generator().manual_seed(0)).to(device)
    batches = {"ours": [(seq[:, :-1], seq[:, 1:]) for seq in data], "llama": [(seq[:, :-1], seq[:, :-1]) for seq in data]}
    for name, (_, forward_backward, optimizer_step, _) in models.items():
        for _ in range(args.warmup):
            time_step(forward_backward, optimizer_step, batches[name], device, autocast, clock)

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    peak_memory: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, (_, forward_backward, optimizer_step, _) in models.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            round_times = [time_step(forward_backward, optimizer_step, batches[name], device, autocast, clock)
                           for _ in range(args.steps)]
            times[name].append(tuple(map(statistics.mean, zip(*round_times, strict=True))))
            if device.type == "cuda":
                peak_memory[name] = torch.cuda.max_memory_allocated() / 2**30

    peak = peak_flops(device)
    throughput = {}
    fb_throughput = {}
    for name, (*_, flops) in models.items():
        fb_seconds = statistics.median(t[0] for t in times[name])
        step_seconds = statistics.median(t[0] + t[1] for t in times[name])
        throughput[name] = tokens_per_step / step_seconds
        fb_throughput[name] = tokens_per_step / fb_seconds
        mfu = f"{100 * throughput[name] * flops / peak:.1f}%" if peak else "n/a"
        memory = f" | peak memory {peak_memory[name]:.2f} GiB" if name in peak_memory else ""
        print(f"{name:>5}: step {step_seconds * 1000:8.1f} ms (forward+backward {fb_seconds * 1000:.1f} ms, optimizer "
              f"{(step_seconds - fb_seconds) * 1000:.1f} ms) | {throughput[name]:>9,.0f} tok/s | MFU {mfu}{memory}")
    print(f"ratio ours/llama tokens/s: training step {throughput['ours'] / throughput['llama']:.2f}x, "
          f"forward+backward only {fb_throughput['ours'] / fb_throughput['llama']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
