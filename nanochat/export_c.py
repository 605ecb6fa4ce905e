"""Export a model for the C runner (runc/run.c): DIR/model.bin and DIR/tokenizer.bin. This docstring is the one
description of both formats; runc/run.c reads exactly this.

All integers and floats are little-endian; i32/u32/u64 are 4/4/8-byte integers, f32 IEEE floats. CRC-32 is zlib's.

model.bin
---------
A 256-byte header, then the tensors. Every tensor starts at a multiple of 64 bytes: each is followed by zero bytes
up to the next multiple of 64 (the file ends on that padding too), so the file's size follows from the header alone.

    offset  type      field
    0       8 bytes   magic "NCHATMDL"
    8       u32       format version (2; the runner also reads version 1, which is version 2 with no 2026-recipe
                      change on and no window tensor)
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
    100     u32       the 2026-recipe changes on (GPTConfig fields): bit 0 value_embeddings, 1 layer_scalars,
                      2 smear, 3 backout
    104     i32       gate_channels: the input channels the value-embedding and smear gates read
    108     f32       qk_gain: the attention's softmax scale is qk_gain / sqrt(head_dim)
    112     zeros up to 252
    252     u32       CRC-32 of bytes 100..251

The tensors, in this order (head_dim = n_embd / n_head, kv_dim = n_kv_head * head_dim; a matrix is (rows = out
features, cols = in features), row-major, as nn.Linear stores it; [bit] marks a tensor present only with that
change on; a value-embedding layer is one whose n_layer - 1 - index is even):

    inv_freq                    head_dim / 2 f32: the rotary inverse frequencies, as GPT._rotary_tables computes
                                them (the angle of pair i at position p is the f32 product p * inv_freq[i])
    windows                     n_layer u32: how many positions each layer's queries see, their own included
                                (attention.attention_window; 0: the whole context)
    wte                         vocab_size x n_embd f32 (always fp32: a lookup reads one row per token)
    [value_embeddings]          for each value-embedding layer, in order: vocab_size x kv_dim f32 (a lookup table)
    for each layer 0 .. n_layer-1:
        attn.c_q                n_head * head_dim x n_embd
        attn.c_k                kv_dim x n_embd
        attn.c_v                kv_dim x n_embd
        attn.c_proj             n_embd x n_embd
        mlp.c_fc                mlp_hidden x n_embd
        mlp.c_proj              n_embd x mlp_hidden
        [value_embeddings]      attn.ve_gate, n_kv_head x gate_channels f32, on a value-embedding layer
    lm_head                     vocab_size x n_embd
    [layer_scalars]             resid_lambdas, then x0_lambdas: n_layer f32 each
    [smear]                     smear_gate (gate_channels f32), then smear_lambda (1 f32)
    [backout]                   backout_lambda (1 f32)

A model trained with vocab_multiple > 1 is written with its first vocab_size rows of every table and of lm_head: the
padding rows are never looked up and their logits are never returned. The gates and scalars are fp32 in every file.
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

from nanochat.attention import GATE_CHANNELS, attention_window, has_value_embedding
from nanochat.common import _atomic_replace, atomic_write_bytes
from nanochat.gpt import GPT
from nanochat.loading import ExportError
from nanochat.quantize import GROUP_SIZE, QUANTIZATIONS, quantize_groupwise
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

MODEL_FILE, TOKENIZER_FILE = "model.bin", "tokenizer.bin"
MODEL_MAGIC, TOKENIZER_MAGIC = b"NCHATMDL", b"NCHATTOK"
MODEL_FORMAT_VERSION, TOKENIZER_FORMAT_VERSION = 2, 1
MODEL_HEADER_BYTES, TOKENIZER_HEADER_BYTES = 256, 64
ALIGNMENT = 64
LAYER_MATRICES = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
FEATURE_BITS = {"value_embeddings": 1, "layer_scalars": 2, "smear": 4, "backout": 8}  # header offset 100
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
    header = model_header(model, tokenizer, group_size, file_bytes=model_file_bytes(tensors, group_size))
    _atomic_replace(directory / MODEL_FILE, lambda f: write_model(f, header, tensors, group_size))


# -----------------------------------------------------------------------------
# What the format can express


def check_exportable(model: GPT, tokenizer: Tokenizer, meta: dict, group_size: int) -> None:
    if not isinstance(model, GPT):
        raise ExportError(f"the C format holds a nanochat GPT, got {type(model).__name__}")
    expected = set(expected_weight_names(model.config))
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


def expected_weight_names(config) -> list[str]:
    """The state_dict names, in file order (inv_freq and windows are computed, not weights)."""
    layers = range(config.n_layer)
    value_layers = [i for i in layers if config.value_embeddings and has_value_embedding(i, config.n_layer)]
    names = ["transformer.wte.weight", *(f"value_embeds.{i}.weight" for i in value_layers)]
    for layer in layers:
        names += [f"transformer.h.{layer}.{matrix}.weight" for matrix in LAYER_MATRICES]
        names += [f"transformer.h.{layer}.attn.ve_gate"] if layer in value_layers else []
    names.append("lm_head.weight")
    names += ["resid_lambdas", "x0_lambdas"] if config.layer_scalars else []
    names += ["smear_gate", "smear_lambda"] if config.smear else []
    return names + (["backout_lambda"] if config.backout else [])


# -----------------------------------------------------------------------------
# model.bin


def rotary_inverse_frequencies(config) -> torch.Tensor:
    """What GPT._rotary_tables multiplies positions by, computed the same way (fp32 throughout)."""
    head_dim = config.n_embd // config.n_head
    return 1.0 / (config.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def layer_windows(config) -> torch.Tensor:
    return torch.tensor([attention_window(config, i) or 0 for i in range(config.n_layer)], dtype=torch.int64)


def is_matrix(name: str) -> bool:
    """The tensors int8 export rounds: the layers' linear maps and the LM head (not lookups, gates or scalars)."""
    return name == "lm_head.weight" or name.endswith(tuple(f".{matrix}.weight" for matrix in LAYER_MATRICES))


def model_tensors(model: GPT) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) in file order; every table and the LM head cut to the unpadded vocabulary."""
    config, state = model.config, model.state_dict()
    tensors = [("inv_freq", rotary_inverse_frequencies(config)), ("windows", layer_windows(config))]
    for name in expected_weight_names(config):
        tensor = state[name]
        if name in ("transformer.wte.weight", "lm_head.weight") or name.startswith("value_embeds."):
            tensor = tensor[:config.vocab_size]
        tensors.append((name, tensor.reshape(-1) if tensor.dim() == 0 else tensor))
    return tensors


def aligned(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def tensor_file_bytes(name: str, tensor: torch.Tensor, group_size: int) -> int:
    if group_size and is_matrix(name):
        rows, cols = tensor.shape
        return aligned(rows * cols) + aligned(rows * (cols // group_size) * 4)
    return aligned(tensor.numel() * 4)  # f32 or u32


def model_file_bytes(tensors: list[tuple[str, torch.Tensor]], group_size: int) -> int:
    """The size model.bin will have: the header, then every tensor padded to ALIGNMENT."""
    return MODEL_HEADER_BYTES + sum(tensor_file_bytes(name, tensor, group_size) for name, tensor in tensors)


def model_header(model: GPT, tokenizer: Tokenizer, group_size: int, file_bytes: int) -> bytes:
    c = model.config
    fields = [c.n_layer, c.n_head, c.n_kv_head, c.n_embd, c.vocab_size, c.sequence_len, model.rotary_len,
              4 * c.n_embd, group_size]
    if max(fields) >= 2**31:
        raise ExportError(f"a model dimension does not fit the header's 32-bit fields: {fields}")
    head = struct.pack("<8sII9i3f16sIIQ", MODEL_MAGIC, MODEL_FORMAT_VERSION, MODEL_HEADER_BYTES, *fields, c.rope_base,
                       model.SOFTCAP, torch.finfo(torch.float32).eps, tokenizer.fingerprint().encode("ascii"),
                       tokenizer.get_vocab_size(), 0, file_bytes)
    head += struct.pack("<I", zlib.crc32(head))
    features = sum(bit for name, bit in FEATURE_BITS.items() if getattr(c, name))
    recipe = struct.pack("<Iif", features, min(GATE_CHANNELS, c.n_embd), c.qk_gain).ljust(152, b"\0")
    return head + recipe + struct.pack("<I", zlib.crc32(recipe))


def write_model(f, header: bytes, tensors: list[tuple[str, torch.Tensor]], group_size: int) -> None:
    f.write(header)
    for name, tensor in tensors:
        if name == "windows":
            write_padded(f, tensor.numpy().astype("<u4").tobytes())
            continue
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()
        if group_size and is_matrix(name):
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
    header = struct.pack("<8sIIII16sIIII", TOKENIZER_MAGIC, TOKENIZER_FORMAT_VERSION, len(ranked),
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
