"""Serve a chat model over HTTP: load the model (one replica per GPU), start its continuous-batching schedulers
and run the app of nanochat/server.py (the web UI, a simple streaming API, an OpenAI-compatible API) under uvicorn.

    python -m scripts.chat_web                      # the SFT model on http://127.0.0.1:8000
    python -m scripts.chat_web --source rl --host 0.0.0.0 --port 8080 --max-concurrent 32
    python -m scripts.chat_web --hf DIR --quantize int8   # a Hugging Face directory, int8 weights

The endpoints are listed in nanochat/server.py.
"""

from __future__ import annotations

import argparse

import torch
import uvicorn

from nanochat.batching import Scheduler
from nanochat.common import autodetect_device_type
from nanochat.engine import Engine, prepare_for_serving
from nanochat.execution import add_unsafe_tool_flag, served_tool_requires_confinement
from nanochat.loading import add_model_arguments, load_model_from_args, model_name
from nanochat.server import Defaults, create_app
from nanochat.training import cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a nanochat model: web UI + OpenAI-compatible API")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000)
    add_model_arguments(parser)
    parser.add_argument("--temperature", type=float, default=0.8, help="default temperature for requests")
    parser.add_argument("--top-k", type=int, default=50, help="default top-k for the UI's API (0 = off)")
    parser.add_argument("--max-tokens", type=int, default=512, help="default tokens per reply")
    parser.add_argument("--max-concurrent", type=int, default=32, help="chats decoded together, per replica")
    parser.add_argument("--max-queue", type=int, default=128, help="requests waiting per replica before 429")
    parser.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
    add_unsafe_tool_flag(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.temperature <= 2:
        parser.error(f"--temperature must be in [0, 2], got {args.temperature}")
    if args.max_tokens < 1 or args.max_concurrent < 1 or args.max_queue < 0:
        parser.error("--max-tokens and --max-concurrent must be >= 1, --max-queue >= 0")

    device_type = args.device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        parser.error("--device-type=cuda but no CUDA GPU is visible; use --device-type=cpu")
    devices = ([torch.device("cuda", i) for i in range(torch.cuda.device_count())] if device_type == "cuda"
               else [torch.device(device_type)])
    schedulers, tokenizer, meta = [], None, {}
    require_confinement = served_tool_requires_confinement(args.unsafe_python_tool)
    for device in devices:
        model, tokenizer, meta = load_model_from_args(args, device)
        engine = Engine(prepare_for_serving(model, quantization=args.quantize), tokenizer,
                        require_confinement=require_confinement)
        schedulers.append(Scheduler(engine, max_batch_size=args.max_concurrent, max_queue=args.max_queue))
    name = model_name(args, meta)
    defaults = Defaults(temperature=args.temperature, top_k=args.top_k or None, max_tokens=args.max_tokens)
    app = create_app(schedulers, tokenizer, model_name=name, defaults=defaults)
    print(f"serving {name} on {len(devices)} replica(s) ({', '.join(map(str, devices))}) in "
          f"{str(model.transformer.wte.weight.dtype).removeprefix('torch.')} at http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    cli(main)
