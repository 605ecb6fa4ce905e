"""Take a trained model out of this repository: for the C runner (runc/) or for Hugging Face transformers.

    python -m scripts.export --source sft --format c --out out/c              # runc/run out/c --chat
    python -m scripts.export --source sft --format c --quantize int8 --out out/c8
    python -m scripts.export --source sft --format hf --out out/hf            # AutoModelForCausalLM.from_pretrained

The output directory appears complete or not at all: it is written beside its final place and renamed into it.
An existing directory is replaced only with --overwrite (and only once the new one is complete).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from nanochat.loading import add_model_arguments, load_model_from_args
from nanochat.quantize import QUANTIZATIONS
from nanochat.training import cli

FORMATS = ("c", "hf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, hf=False, quantize=False)
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="c: model.bin + tokenizer.bin for runc/run; hf: a transformers directory")
    parser.add_argument("--out", required=True, type=Path, help="directory to write")
    parser.add_argument("--quantize", default="none", choices=QUANTIZATIONS,
                        help="--format c only: int8 weights in groups of 64 with one fp32 scale each")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    args = parser.parse_args(argv)
    if args.format == "hf" and args.quantize != "none":
        parser.error("--quantize is for --format c; transformers' NanoChat loads full-precision weights")
    if args.out.exists() and not args.overwrite:
        parser.error(f"{args.out} exists; pass --overwrite to replace it, or choose another --out")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"{args.out} exists and is not a directory")
    return args


def write_export(args: argparse.Namespace, model, tokenizer, meta: dict, directory: Path) -> None:
    if args.format == "c":
        from nanochat.export_c import export_c

        export_c(model, tokenizer, meta, directory, quantization=args.quantize)
    else:
        from nanochat.hf import export_hf

        export_hf(model, tokenizer, meta, directory)


def replace_directory(new: Path, final: Path) -> None:
    """Put the complete directory `new` at `final`; an old `final` is moved aside first and removed last."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    new.rename(final)
    if old.exists():
        shutil.rmtree(old)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    model, tokenizer, meta = load_model_from_args(args, torch.device("cpu"))
    model = model.float().eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        with torch.no_grad():
            write_export(args, model, tokenizer, meta, staging)
        replace_directory(staging, args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {args.format} export of {args.source} step {meta.get('step')} to {args.out}: "
          + ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in sorted(args.out.iterdir())))
    return args.out


if __name__ == "__main__":
    cli(main)
