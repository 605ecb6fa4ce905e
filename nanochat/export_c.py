"""Export a model for the C runner (runc/run.c): DIR/model.bin and DIR/tokenizer.bin. This docstring is the one
description of both formats; runc/run.c reads exactly this.

All integers and floats are little-endian; i32/u32/u64 are 4/4/8-byte integers, f32 IEEE floats. CRC-32 is zlib's.

model.bin
---------
A 256-byte header, then the tensors. Every tensor starts at a multiple of 64 bytes: each is followed by zero bytes
up to the next multiple of 64 (the file ends on that padding too), so the file's size follows from the header alone.

    offset  type      field
    0       8 bytes   magic "NCHATMDL"
    8       u32       format version (1)
    12      u32       header bytes (256)
    16      i32 x 9   n_layer, n_head, n_kv_head, n_embd, vocab_size, sequence_len, rotary_len (positions the rotary
                      table covers: GPT.rotary_len), mlp_hidden (4 * n_embd), group_size (0: fp32 weights; 64: int8)
    52      f32 x 3   rope_base, softcap (GPT.SOFTCAP: logits = softcap * tanh(logits / softcap)), norm_eps (the eps
                      F.rms_norm uses for fp32: torch.finfo(torch.float32).eps)
    64      16 bytes  the tokenizer's fingerprint (Tokenizer.fingerprint(), ASCII hex): tokenizer.bin must carry it
    80      u32       the tokenizer's vocabulary size (<= vocab_size)
    84      u32       0 (reserved)
    88      u64       the file's size in bytes
    96      u32       CRC-32 of bytes 0..95
    100     zeros up to 256

The tensors, in this order (head_dim = n_embd / n_head; a matrix is (rows = out features, cols = in features),
row-major, as nn.Linear stores it):

    inv_freq                    head_dim / 2 f32: the rotary inverse frequencies, as GPT._rotary_tables computes
                                them (the angle of pair i at position p is the f32 product p * inv_freq[i])
    wte                         vocab_size x n_embd f32 (always fp32: a lookup reads one row per token)
    for each layer 0 .. n_layer-1:
        attn.c_q                n_head * head_dim x n_embd
        attn.c_k                n_kv_head * head_dim x n_embd
        attn.c_v                n_kv_head * head_dim x n_embd
        attn.c_proj             n_embd x n_embd
        mlp.c_fc                mlp_hidden x n_embd
        mlp.c_proj              n_embd x mlp_hidden
    lm_head                     vocab_size x n_embd

With group_size 0 each matrix is rows x cols f32. With group_size g (int8) each matrix is two tensors: rows x cols
int8 values, then rows x (cols / g) f32 scales, one per g consecutive values of a row; a weight is value * scale.
They are what nanochat.quantize.quantize_groupwise returns, the rounding PyTorch's int8 engine uses too.

tokenizer.bin
-------------
A 64-byte header, then the body.

    offset  type      field
    0       8 bytes   magic "NCHATTOK"
    8       u32       format version (1)
    12      u32       n_mergeable: the byte-level tokens, ids 0 .. n_mergeable-1 (an id is its merge rank)
    16      u32       n_special: special tokens
    20      u32       vocab_size (n_mergeable + n_special)
    24      16 bytes  the fingerprint (as in model.bin)
    40      u32       pattern bytes
    44      u32       n_ranges: Unicode class ranges
    48      u32       body bytes (everything after the header)
    52      u32       CRC-32 of the body
    56      zeros up to 64
    body:   the split pattern, UTF-8 (the runner implements nanochat.tokenizer.SPLIT_PATTERN and refuses another)
            n_mergeable x (u32 length, the token's bytes), in rank order
            n_special x (u32 id, u32 length, the name's bytes), e.g. "<|bos|>"
            n_ranges x (u32 first, u32 last, u32 class): sorted, disjoint, inclusive code point ranges of the classes
            the pattern needs, 1 = \\p{L}, 2 = \\p{N}, 3 = \\s (Unicode's White_Space); every other code point is none
            of them. Generated here from Python's unicodedata, so the C needs no Unicode library; on characters
            assigned after Python's Unicode version tiktoken (a newer one) may split differently.
"""

from __future__ import annotations

import functools
import struct
import sys
import unicodedata
import zlib
from pathlib import Path

import torch

from nanochat.common import _atomic_replace, atomic_write_bytes
from nanochat.gpt import GPT, recipe_changes_on
from nanochat.loading import ExportError
from nanochat.quantize import GROUP_SIZE, QUANTIZATIONS, quantize_groupwise
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

MODEL_FILE, TOKENIZER_FILE = "model.bin", "tokenizer.bin"
MODEL_MAGIC, TOKENIZER_MAGIC = b"NCHATMDL", b"NCHATTOK"
FORMAT_VERSION = 1
MODEL_HEADER_BYTES, TOKENIZER_HEADER_BYTES = 256, 64
ALIGNMENT = 64
LAYER_MATRICES = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
CLASS_LETTER, CLASS_NUMBER, CLASS_SPACE = 1, 2, 3
# Python's str.isspace() counts the information separators U+001C..U+001F as space; Unicode's White_Space, which
# the regex crate's \s (inside tiktoken) follows, does not
NOT_WHITE_SPACE = {0x1C, 0x1D, 0x1E, 0x1F}


def export_c(model: GPT, tokenizer: Tokenizer, meta: dict, directory: Path, quantization: str = "none") -> None:
    """Write directory/model.bin and directory/tokenizer.bin (formats above), each atomically. quantization "int8"
    rounds the hidden matrices and the LM head to int8 groups of 64; the embedding stays fp32. Raises ExportError
    for a model or tokenizer the format cannot express."""
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    group_size = GROUP_SIZE if quantization == "int8" else 0
    check_exportable(model, tokenizer, meta, group_size)
    directory = Path(directory)
    atomic_write_bytes(directory / TOKENIZER_FILE, tokenizer_file_bytes(tokenizer))
    tensors = model_tensors(model)
    header = model_header(model, tokenizer, group_size, file_bytes=model_file_bytes(model.config, group_size))
    _atomic_replace(directory / MODEL_FILE, lambda f: write_model(f, header, tensors, group_size))


# -----------------------------------------------------------------------------
# What the format can express


def check_exportable(model: GPT, tokenizer: Tokenizer, meta: dict, group_size: int) -> None:
    if not isinstance(model, GPT):
        raise ExportError(f"the C format holds a nanochat GPT, got {type(model).__name__}")
    features = recipe_changes_on(model.config)
    if features:
        raise ExportError(f"runc/run.c runs the plain GPT; this model has GPTConfig {', '.join(features)} on, which "
                          "it does not implement: serve it with python -m scripts.chat_cli instead")
    expected = set(expected_weight_names(model.config.n_layer))
    names = set(model.state_dict())
    if names != expected:
        extra, missing = sorted(names - expected), sorted(expected - names)
        raise ExportError(f"the C format holds exactly the GPT's weights; this model has extra {extra[:4]} and lacks "
                          f"{missing[:4]} (export the model as loaded from its checkpoint: adapters merged, "
                          "not prepared for serving or quantized)")
    if tokenizer.pattern != SPLIT_PATTERN:
        raise ExportError("runc/run.c implements nanochat.tokenizer.SPLIT_PATTERN only; this tokenizer splits with "
                          f"{tokenizer.pattern!r}: retrain it with `python -m scripts.tok_train`")
    missing_special = [name for name in SPECIAL_TOKENS if name not in tokenizer.special_tokens]
    if missing_special:
        raise ExportError(f"the tokenizer lacks the special tokens {missing_special} the chat format needs")
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                          f"{model.config.vocab_size} embeddings")
    saved = meta.get("tokenizer_fingerprint")
    if saved is not None and saved != tokenizer.fingerprint():
        raise ExportError(f"the model was trained with tokenizer {saved}, not {tokenizer.fingerprint()}: export it "
                          "with the tokenizer it was trained with")
    widths = {model.config.n_embd, 4 * model.config.n_embd}
    if group_size and any(width % group_size for width in widths):
        raise ExportError(f"int8 groups of {group_size} need a model width divisible by {group_size}, got "
                          f"n_embd={model.config.n_embd}: export it with --quantize none")


def expected_weight_names(n_layer: int) -> list[str]:
    """The state_dict names, in file order (after inv_freq)."""
    names = ["transformer.wte.weight"]
    for layer in range(n_layer):
        names += [f"transformer.h.{layer}.{matrix}.weight" for matrix in LAYER_MATRICES]
    return names + ["lm_head.weight"]


# -----------------------------------------------------------------------------
# model.bin


def rotary_inverse_frequencies(config) -> torch.Tensor:
    """What GPT._rotary_tables multiplies positions by, computed the same way (fp32 throughout)."""
    head_dim = config.n_embd // config.n_head
    return 1.0 / (config.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def model_tensors(model: GPT) -> list[tuple[str, torch.Tensor]]:
    state = model.state_dict()
    tensors = [("inv_freq", rotary_inverse_frequencies(model.config))]
    return tensors + [(name, state[name]) for name in expected_weight_names(model.config.n_layer)]


def aligned(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def model_file_bytes(config, group_size: int) -> int:
    """The size model.bin will have: the header, then every tensor padded to ALIGNMENT."""
    head_dim, hidden = config.n_embd // config.n_head, 4 * config.n_embd
    matrices = []
    for _ in range(config.n_layer):
        matrices += [(config.n_head * head_dim, config.n_embd), (config.n_kv_head * head_dim, config.n_embd),
                     (config.n_kv_head * head_dim, config.n_embd), (config.n_embd, config.n_embd),
                     (hidden, config.n_embd), (config.n_embd, hidden)]
    matrices.append((config.vocab_size, config.n_embd))
    size = MODEL_HEADER_BYTES + aligned(head_dim // 2 * 4) + aligned(config.vocab_size * config.n_embd * 4)
    for rows, cols in matrices:
        if group_size:
            size += aligned(rows * cols) + aligned(rows * (cols // group_size) * 4)
        else:
            size += aligned(rows * cols * 4)
    return size


def model_header(model: GPT, tokenizer: Tokenizer, group_size: int, file_bytes: int) -> bytes:
    c = model.config
    fields = [c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.vocab_size, c.sequence_len, model.rotary_len,
              4 * c.n_embd, group_size]
    if max(fields) >= 2**31:
        raise ExportError(f"a model dimension does not fit the header's 32-bit fields: {fields}")
    head = struct.pack("<8sII9i3f16sIIQ", MODEL_MAGIC, FORMAT_VERSION, MODEL_HEADER_BYTES, *fields, c.rope_base,
                       model.SOFTCAP, torch.finfo(torch.float32).eps, tokenizer.fingerprint().encode("ascii"),
                       tokenizer.get_vocab_size(), 0, file_bytes)
    head += struct.pack("<I", zlib.crc32(head))
    return head.ljust(MODEL_HEADER_BYTES, b"\0")


def write_model(f, header: bytes, tensors: list[tuple[str, torch.Tensor]], group_size: int) -> None:
    f.write(header)
    for name, tensor in tensors:
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        if group_size and name not in ("inv_freq", "transformer.wte.weight"):
            values, scales = quantize_groupwise(tensor, group_size)
            write_padded(f, values.numpy().tobytes())
            write_padded(f, scales.contiguous().numpy().astype("<f4").tobytes())
        else:
            write_padded(f, tensor.numpy().astype("<f4").tobytes())


def write_padded(f, data: bytes) -> None:
    f.write(data)
    f.write(b"\0" * (aligned(len(data)) - len(data)))


# -----------------------------------------------------------------------------
# tokenizer.bin


def tokenizer_file_bytes(tokenizer: Tokenizer) -> bytes:
    ranked = sorted(tokenizer.mergeable_ranks.items(), key=lambda item: item[1])
    if [rank for _, rank in ranked] != list(range(len(ranked))):
        raise ExportError("the tokenizer's merge ranks are not 0, 1, 2, ...: retrain it with "
                          "`python -m scripts.tok_train`")
    pattern = tokenizer.pattern.encode("utf-8")
    ranges = unicode_class_ranges()
    body = [pattern]
    body += [struct.pack("<I", len(token)) + token for token, _ in ranked]
    for name, token_id in tokenizer.special_tokens.items():
        encoded = name.encode("utf-8")
        body.append(struct.pack("<II", token_id, len(encoded)) + encoded)
    body += [struct.pack("<III", *entry) for entry in ranges]
    body_bytes = b"".join(body)
    header = struct.pack("<8sIIII16sIIII", TOKENIZER_MAGIC, FORMAT_VERSION, len(ranked),
                         len(tokenizer.special_tokens), tokenizer.get_vocab_size(),
                         tokenizer.fingerprint().encode("ascii"), len(pattern), len(ranges), len(body_bytes),
                         zlib.crc32(body_bytes))
    return header.ljust(TOKENIZER_HEADER_BYTES, b"\0") + body_bytes


def unicode_class(code_point: int) -> int:
    char = chr(code_point)
    category = unicodedata.category(char)
    if category[0] == "L":
        return CLASS_LETTER
    if category[0] == "N":
        return CLASS_NUMBER
    if char.isspace() and code_point not in NOT_WHITE_SPACE:
        return CLASS_SPACE
    return 0


@functools.cache
def unicode_class_ranges() -> tuple[tuple[int, int, int], ...]:
    """(first, last, class) runs of consecutive code points of one class, class 0 left out (a second to compute)."""
    ranges: list[list[int]] = []
    for code_point in range(sys.maxunicode + 1):
        cls = unicode_class(code_point)
        if cls and ranges and ranges[-1][2] == cls and ranges[-1][1] == code_point - 1:
            ranges[-1][1] = code_point
        elif cls:
            ranges.append([code_point, code_point, cls])
    return tuple(tuple(entry) for entry in ranges)
