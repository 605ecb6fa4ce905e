"""Where a model to talk to comes from, chosen by the same flags in every script that serves or exports one:
a stage's checkpoint (--source, --tag, --step) or a Hugging Face directory in the nanochat format (--hf DIR), and
the form it is served in (--quantize int8)."""

from __future__ import annotations

import argparse

import torch

from nanochat.quantize import QUANTIZATIONS

SOURCES = ("base", "mid", "sft", "rl")


class ExportError(RuntimeError):
    """A model that a format cannot express, or an exported directory that cannot be read back: the message names
    the feature or the file, and the fix."""


def add_model_arguments(parser: argparse.ArgumentParser, default_source: str = "sft", hf: bool = True,
                        quantize: bool = True) -> None:
    parser.add_argument("--source", default=default_source, choices=SOURCES, help="which stage's model")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the largest model)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    if hf:
        parser.add_argument("--hf", default=None, metavar="DIR",
                            help="load a Hugging Face directory in the nanochat format (scripts.export --format hf) "
                                 "instead of a checkpoint")
    if quantize:
        parser.add_argument("--quantize", default="none", choices=QUANTIZATIONS,
                            help="int8: weight-only int8 groups of 64 for the linear layers (4x smaller)")


def model_name(args: argparse.Namespace, meta: dict) -> str:
    """How the model calls itself in logs and in the API's `model` field."""
    if getattr(args, "hf", None):
        return f"nanochat-hf-{meta.get('name', 'model')}"
    return f"nanochat-{args.source}-{args.tag or 'latest'}-step{meta.get('step', args.step)}"


def load_model_from_args(args: argparse.Namespace, device: torch.device, phase: str = "eval"):
    """(model, tokenizer, meta) for the flags of add_model_arguments."""
    if getattr(args, "hf", None):
        from nanochat.hf import load_hf_directory

        return load_hf_directory(args.hf, device, phase=phase)
    from nanochat.checkpoint import load_model

    return load_model(args.source, device, phase=phase, tag=args.tag, step=args.step)
