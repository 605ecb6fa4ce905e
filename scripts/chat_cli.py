"""Chat with a model in the terminal; replies stream as they are generated.

    python -m scripts.chat_cli                                  # talk to the SFT model
    python -m scripts.chat_cli --source rl --temperature 0.6
    python -m scripts.chat_cli -p "Why is the sky blue?"        # one answer, then exit
    python -m scripts.chat_cli --quantize int8                  # int8 weights (4x smaller)
    python -m scripts.chat_cli --hf DIR                         # a Hugging Face directory (scripts.export --format hf)

In the chat: /clear starts over, /exit (or Ctrl-D) quits. Python tool calls and their output are shown as
they happen (in colour on a terminal).
"""

from __future__ import annotations

import argparse
import sys

import torch

from nanochat.common import autodetect_device_type
from nanochat.engine import Engine, TextStream, prepare_for_serving
from nanochat.execution import add_unsafe_tool_flag, served_tool_requires_confinement
from nanochat.loading import add_model_arguments, load_model_from_args, model_name
from nanochat.training import cli

# ANSI colours for tool calls and their output; plain text when stdout is not a terminal
PART_COLOURS = {"python": "\033[33m", "python_output": "\033[36m"}
RESET = "\033[0m"


def stream_reply(engine: Engine, messages: list[dict], args: argparse.Namespace, out=None) -> list[dict]:
    """Generate the assistant's next message, printing it as it streams (to `out`, default the sys.stdout of the
    moment, not of import time); returns its parts."""
    out = out or sys.stdout
    prompt = engine.tokenizer.render_for_completion({"messages": messages})
    special, text_stream = engine.special, TextStream(engine.tokenizer)
    colour = out.isatty()
    parts: list[dict] = [{"type": "text", "text": ""}]
    for column, _masks in engine.generate(prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                          top_k=args.top_k or None, seed=args.seed):
        token = column[0]
        if token in special.stops:
            break
        if token in special.part_after:
            part = special.part_after[token]
            parts.append({"type": part, "text": ""})
            if colour:
                out.write(PART_COLOURS.get(part, RESET))
            out.write({"python": "\n[python] ", "python_output": " -> "}.get(part, "\n"))
            continue
        piece = text_stream.feed(token)
        parts[-1]["text"] += piece
        out.write(piece)
        out.flush()
    tail = text_stream.flush()
    parts[-1]["text"] += tail
    out.write(tail + (RESET if colour else "") + "\n")
    out.flush()
    return [part for part in parts if part["text"]] or [{"type": "text", "text": ""}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat with a nanochat model in the terminal")
    parser.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    add_model_arguments(parser)
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0 = all)")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens")
    parser.add_argument("--seed", type=int, default=None, help="make the sampling reproducible")
    parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
    add_unsafe_tool_flag(parser)
    args = parser.parse_args(argv)
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0 or args.max_tokens < 1:
        parser.error("--top-k must be >= 0 and --max-tokens >= 1")

    device_type = args.device_type or autodetect_device_type()
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device(device_type)
    model, tokenizer, meta = load_model_from_args(args, device)
    engine = Engine(prepare_for_serving(model, quantization=args.quantize), tokenizer,
                    require_confinement=served_tool_requires_confinement(args.unsafe_python_tool))

    if args.prompt is not None:
        if not args.prompt.strip():
            parser.error("-p needs a non-empty prompt")
        stream_reply(engine, [{"role": "user", "content": args.prompt}], args)
        return 0

    print(f"{model_name(args, meta)} — /clear to start over, /exit to quit")
    messages: list[dict] = []
    while True:
        try:
            text = input("\nYou: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text in ("/exit", "/quit"):
            return 0
        if text == "/clear":
            messages = []
            print("(conversation cleared)")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        print("nanochat: ", end="", flush=True)
        try:
            parts = stream_reply(engine, messages, args)
        except ValueError as e:  # the conversation outgrew the context window
            messages.pop()
            print(f"\n({e}; type /clear to start a new conversation)")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            messages.pop()
            print("\n(interrupted)")
            continue
        messages.append({"role": "assistant", "content": parts})


if __name__ == "__main__":
    cli(main)
