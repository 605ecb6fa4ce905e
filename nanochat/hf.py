"""Hugging Face transformers' NanoChat format, out and in: a directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load with no custom code, and the reader that turns such a directory back into our GPT
and Tokenizer (`chat_cli --hf DIR`, `chat_web --hf DIR`). Neither direction imports transformers.

    config.json             NanoChatConfig: our dims, rope theta, softcap, vocab, sequence length, special ids
    model.safetensors       the weights under transformers' names (the format is written and read here, below)
    tokenizer.json          the `tokenizers` library's byte-level BPE: our ranks as its vocab, merges derived from them,
                            our split pattern, our special tokens as added tokens
    tokenizer_config.json   the chat template, which renders exactly Tokenizer.render_for_completion's ids
    generation_config.json  stop at <|assistant_end|> (or <|bos|>, as the Engine does)

transformers' NanoChat is the architecture of nanochat/gpt.py layer for layer (norm after the embedding, rotary then
QK-norm, ReLU² MLP, untied head, tanh softcap); what it cannot express is refused with an ExportError naming it.
"""

from __future__ import annotations

import itertools
import json
import mmap
import struct
import sys
from dataclasses import asdict, fields
from pathlib import Path

import torch

from nanochat.checkpoint import CheckpointError, build_model
from nanochat.common import _atomic_replace, atomic_write_text
from nanochat.gpt import GPT, GPTConfig
from nanochat.loading import ExportError
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
EXPORT_FIX = "re-export it with `python -m scripts.export --format hf`, or copy the complete directory again"

# -----------------------------------------------------------------------------
# model.safetensors: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}} (offsets
# relative to the end of the header), then the tensors' raw little-endian bytes back to back

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's limit


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": metadata}, 0
    for name, tensor in tensors.items():
        if tensor.dtype not in names:
            raise ExportError(f"weight {name} is {tensor.dtype}; the export writes float32, bfloat16 or float16")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # spaces keep every tensor 8-byte aligned, as the format allows

    def write(f) -> None:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for tensor in tensors.values():
            f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

    _atomic_replace(path, write)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata); the tensors are views of a private memory map of the file, read as they are touched."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0] if size >= 8 else None
        if header_len is None or header_len > min(size - 8, MAX_HEADER_BYTES):
            raise ExportError(f"{path} is truncated or not a safetensors file ({size} bytes): {EXPORT_FIX}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ExportError(f"{path} has a corrupt header ({e}): {EXPORT_FIX}") from None
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: writable, so torch can wrap it
    if not isinstance(header, dict):
        raise ExportError(f"{path} has a corrupt header (not a JSON object): {EXPORT_FIX}")
    metadata = header.pop("__metadata__", None) or {}
    entries = {name: _tensor_entry(path, name, info) for name, info in header.items()}
    data_start, data_len = 8 + header_len, size - 8 - header_len
    promised = max((end for _, _, (_, end) in entries.values()), default=0)
    if promised > data_len:
        raise ExportError(f"{path} is truncated: its header promises {promised} bytes of tensors, the file holds "
                          f"{data_len}: {EXPORT_FIX}")
    spans = sorted(offsets for _, _, offsets in entries.values())
    if any(a[1] != b[0] for a, b in itertools.pairwise(spans)) or promised != data_len:
        raise ExportError(f"{path}: the tensors' byte ranges overlap, leave holes or stop short of the file's end: "
                          f"{EXPORT_FIX}")
    tensors = {}
    for name, (dtype, shape, (begin, _end)) in entries.items():
        numel = torch.Size(shape).numel()
        tensors[name] = (torch.frombuffer(buffer, dtype=dtype, count=numel, offset=data_start + begin).view(shape)
                         if numel else torch.empty(shape, dtype=dtype))
    return tensors, metadata


def _tensor_entry(path: Path, name: str, info) -> tuple[torch.dtype, list[int], list[int]]:
    try:
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        valid = (all(isinstance(n, int) and n >= 0 for n in shape + offsets) and len(offsets) == 2
                 and offsets[0] <= offsets[1])
    except (TypeError, KeyError):
        valid = False
    if not valid:
        raise ExportError(f"{path}: the header entry of {name} is not {{dtype, shape, data_offsets}}: {EXPORT_FIX}")
    if dtype not in SAFETENSORS_DTYPES:
        raise ExportError(f"{path}: tensor {name} is {dtype}; nanochat reads {', '.join(SAFETENSORS_DTYPES)}: convert "
                          "the weights (e.g. model.to(torch.float32).save_pretrained(DIR)) and try again")
    itemsize = SAFETENSORS_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != torch.Size(shape).numel() * itemsize:
        raise ExportError(f"{path}: tensor {name} of shape {shape} should take {torch.Size(shape).numel() * itemsize} "
                          f"bytes, its offsets span {offsets[1] - offsets[0]}: {EXPORT_FIX}")
    return SAFETENSORS_DTYPES[dtype], shape, offsets


# -----------------------------------------------------------------------------
# The model: our GPTConfig and weight names <-> NanoChatConfig and transformers' names

EXPRESSIBLE_FIELDS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "rope_base"}
# our RMSNorm is F.rms_norm without eps: the dtype's machine epsilon, which this is for fp32
RMS_NORM_EPS = torch.finfo(torch.float32).eps
# a published model's eps may be larger; up to this the difference is far below fp32 noise at unit-RMS activations
MAX_IMPORT_EPS = 1e-5


def weight_names(n_layer: int) -> dict[str, str]:
    """Our state_dict names -> transformers' NanoChatForCausalLM names."""
    names = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        ours, theirs = f"transformer.h.{i}.", f"model.layers.{i}."
        for a, b in (("attn.c_q", "self_attn.q_proj"), ("attn.c_k", "self_attn.k_proj"),
                     ("attn.c_v", "self_attn.v_proj"), ("attn.c_proj", "self_attn.o_proj"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            names[f"{ours}{a}.weight"] = f"{theirs}{b}.weight"
    return names


def check_exportable(model: GPT, tokenizer: Tokenizer) -> None:
    """Refuse, naming it, whatever of this model transformers' NanoChat has no setting for."""
    config = model.config
    for field in fields(config):
        value = getattr(config, field.name)
        if field.name not in EXPRESSIBLE_FIELDS and value != field.default:
            raise ExportError(f"GPTConfig.{field.name}={value!r} has no counterpart in transformers' NanoChat: "
                              "only a model trained with its default can be exported to transformers")
    if config.vocab_size < tokenizer.get_vocab_size():
        raise ExportError(f"the model has {config.vocab_size} token embeddings but the tokenizer has "
                          f"{tokenizer.get_vocab_size()} tokens: export the tokenizer the model was trained with")
    expected = set(weight_names(config.n_layer))
    state = {name.removeprefix("_orig_mod.") for name in model.state_dict()}
    if extra := sorted(state - expected):
        raise ExportError(f"the model has weights transformers' NanoChat has no place for ({', '.join(extra[:4])}"
                          f"{', ...' if len(extra) > 4 else ''}): merge adapters into the base weights first "
                          "(LoRA: chat_sft --merge) and export the merged checkpoint")
    if missing := sorted(expected - state):
        raise ExportError(f"the model lacks weights NanoChat needs ({', '.join(missing[:4])}): export a plain GPT")


def hf_config(model: GPT, tokenizer: Tokenizer) -> dict:
    c, special = model.config, tokenizer.special_tokens
    dtype = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    return {
        "architectures": ["NanoChatForCausalLM"], "model_type": "nanochat",
        "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": 4 * c.n_embd,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
        "max_position_embeddings": c.sequence_len, "hidden_act": "relu2", "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},
        "rope_theta": c.rope_base,  # where transformers 4.x reads it (5.x reads rope_parameters)
        "final_logit_softcapping": float(model.SOFTCAP), "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": False, "use_cache": True, "initializer_range": 0.02,
        # no pad id: NanoChat would make it the embedding's padding_idx, freezing that row in any finetuning
        "bos_token_id": special["<|bos|>"], "eos_token_id": special["<|assistant_end|>"], "pad_token_id": None,
        "dtype": dtype,
    }


def gpt_config_from_hf(hf: dict, path: Path) -> GPTConfig:
    """Our GPTConfig for a NanoChatConfig dict; an ExportError naming any setting our GPT cannot express."""
    if hf.get("model_type") != "nanochat":
        raise ExportError(f"{path} is a {hf.get('model_type')!r} model; nanochat loads only model_type 'nanochat' "
                          "(transformers' NanoChat, as `python -m scripts.export --format hf` writes)")
    try:
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        n_kv_head = int(hf.get("num_key_value_heads") or heads)
        rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
        rope_theta = float(rope.get("rope_theta", 10000.0))
        config = {"sequence_len": int(hf["max_position_embeddings"]), "vocab_size": int(hf["vocab_size"]),
                  "n_layer": int(hf["num_hidden_layers"]), "n_head": heads, "n_kv_head": n_kv_head, "n_embd": hidden,
                  "rope_base": rope_theta}
        eps = float(hf.get("rms_norm_eps", RMS_NORM_EPS))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ExportError(f"{path} lacks or garbles a NanoChat setting ({type(e).__name__}: {e}): {EXPORT_FIX}") from None
    unsupported = {
        "intermediate_size": (hf.get("intermediate_size", 4 * hidden), 4 * hidden),
        "hidden_act": (hf.get("hidden_act", "relu2"), "relu2"),
        "attention_bias": (bool(hf.get("attention_bias", False)), False),
        "tie_word_embeddings": (bool(hf.get("tie_word_embeddings", False)), False),
        "final_logit_softcapping": (hf.get("final_logit_softcapping", 15.0), GPT.SOFTCAP),
        "head_dim": (hf.get("head_dim") or hidden // heads, hidden // heads),
        "rope type": (rope.get("rope_type", rope.get("type", "default")), "default"),
        "rope_scaling": (hf.get("rope_scaling"), None),
    }
    for name, (value, ours) in unsupported.items():
        if value != ours:
            raise ExportError(f"{path} sets {name}={value!r}; nanochat's GPT has only {ours!r}: this model needs "
                              "transformers to run it")
    if eps > MAX_IMPORT_EPS:
        raise ExportError(f"{path} sets rms_norm_eps={eps}; nanochat's norms use the fp32 epsilon "
                          f"(at most {MAX_IMPORT_EPS} is close enough): this model needs transformers to run it")
    try:
        return GPTConfig(**config)
    except ValueError as e:
        raise ExportError(f"{path}: {e}") from None


# -----------------------------------------------------------------------------
# The tokenizer: tiktoken ranks <-> the `tokenizers` library's byte-level BPE


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes onto printable characters: the printable Latin-1 bytes stand for
    themselves, the rest take the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


BYTE_TO_UNICODE = byte_to_unicode()
UNICODE_TO_BYTE = {char: byte for byte, char in BYTE_TO_UNICODE.items()}


def _unicode(token: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in token)


def last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The pair tiktoken merges last when it encodes `token` alone (lowest rank first, leftmost on ties); None if
    that encoding is not `token` itself. Within any text, a token is only ever formed by this same merge (the bytes
    it spans see the same sequence of merges), so these pairs, ordered by the rank they make, give `tokenizers` the
    merges that reproduce tiktoken's encoding exactly."""
    parts, last = [bytes([b]) for b in token], None
    while len(parts) > 1:
        candidates = [(ranks[pair], i) for i in range(len(parts) - 1) if (pair := parts[i] + parts[i + 1]) in ranks]
        if not candidates:
            return None
        _, i = min(candidates)
        last = (parts[i], parts[i + 1])
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return last


def tokenizer_json(tokenizer: Tokenizer) -> dict:
    ranks = tokenizer.mergeable_ranks
    merges = []
    for token, _rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1 and (pair := last_merge(token, ranks)) is not None:
            merges.append([_unicode(pair[0]), _unicode(pair[1])])
    added = [{"id": token_id, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for name, token_id in tokenizer.special_tokens.items()]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        # ignore_merges: a chunk that is a whole token is that token, as in tiktoken
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {_unicode(token): rank for token, rank in ranks.items()}, "merges": merges},
    }


def tokenizer_from_json(data: dict, path: Path) -> Tokenizer:
    """Our Tokenizer from a tokenizer.json in the form tokenizer_json writes; ExportError for any other form."""
    try:
        model, steps = data["model"], data["pre_tokenizer"]["pretokenizers"]
        vocab, merges = model["vocab"], model["merges"]
        pattern = steps[0]["pattern"]["Regex"] if steps[0]["type"] == "Split" else None
        byte_level = len(steps) == 2 and steps[1]["type"] == "ByteLevel"
        added = {token["content"]: token["id"] for token in data["added_tokens"]}
    except (KeyError, TypeError, IndexError) as e:
        raise ExportError(f"{path} is not a byte-level BPE with a split pattern, as nanochat writes "
                          f"({type(e).__name__}: {e}): {EXPORT_FIX}") from None
    if model.get("type") != "BPE" or not byte_level or pattern != SPLIT_PATTERN:
        raise ExportError(f"{path} splits text differently from nanochat's tokenizer (model {model.get('type')}, "
                          f"pattern {pattern!r}); nanochat serves only its own byte-level BPE and split pattern")
    try:
        ranks = {bytes(UNICODE_TO_BYTE[char] for char in token): token_id for token, token_id in vocab.items()}
    except KeyError as e:
        raise ExportError(f"{path}: vocab token with character {e} is not byte-level: {EXPORT_FIX}") from None
    if sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256:
        raise ExportError(f"{path}: the vocab's ids are not 0..{len(ranks) - 1}, one per token, single bytes "
                          f"included: {EXPORT_FIX}")
    expected = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    if added != expected:
        raise ExportError(f"{path}: the special tokens are {added}, nanochat's chat format needs {expected}")
    _check_merges_follow_ranks(merges, vocab, path)
    return Tokenizer(ranks, pattern)


def _check_merges_follow_ranks(merges: list, vocab: dict[str, int], path: Path) -> None:
    """tiktoken merges by the ranks alone, `tokenizers` by its list of merges: they agree when each merge makes a
    token of the vocab from two others, listed in the order of the ranks they make (as tokenizer_json writes)."""
    previous = -1
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        made = vocab.get(left + right, -1)
        if left not in vocab or right not in vocab or made <= previous:
            raise ExportError(f"{path}: merge {left!r} + {right!r} does not follow the vocab's ranks, so nanochat's "
                              f"tokenizer would split text differently: {EXPORT_FIX}")
        previous = made


# -----------------------------------------------------------------------------
# The chat template: Tokenizer.render_for_completion in Jinja (transformers renders it with trim_blocks and
# lstrip_blocks; every tag trims its whitespace, so only the strings written below reach the text). With
# add_generation_prompt a final assistant message is dropped and the prompt ends with <|assistant_start|>; without it
# the ids are render_conversation's. Consecutive text parts of one assistant message are tokenized together (ours
# encodes each part alone); pass sanitize_control_tokens=True so special-token names inside messages stay text.

CHAT_TEMPLATE = "".join(line.strip() for line in """
{%- set ns = namespace(messages=messages, system='') -%}
{%- if messages[0]['role'] == 'system' -%}
  {%- if messages | length < 2 or messages[1]['role'] != 'user' -%}
    {{- raise_exception('a system message must be followed by a user message (it is merged into it)') -}}
  {%- endif -%}
  {%- set ns.system = messages[0]['content'] + '\\n\\n' -%}
  {%- set ns.messages = messages[1:] -%}
{%- endif -%}
{{- '<|bos|>' -}}
{%- for message in ns.messages -%}
  {%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}
    {{- raise_exception('messages must alternate user/assistant, starting with user (after an optional system)') -}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {%- if message['content'] is not string -%}
      {{- raise_exception('user content must be a string') -}}
    {%- endif -%}
    {{- '<|user_start|>' + (ns.system if loop.first else '') + message['content'] + '<|user_end|>' -}}
  {%- elif not (add_generation_prompt and loop.last) -%}
    {{- '<|assistant_start|>' -}}
    {%- if message['content'] is string -%}
      {{- message['content'] -}}
    {%- else -%}
      {%- for part in message['content'] -%}
        {%- if part['type'] == 'text' -%}
          {{- part['text'] -}}
        {%- elif part['type'] == 'python' -%}
          {{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}
        {%- elif part['type'] == 'python_output' -%}
          {{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}
        {%- else -%}
          {{- raise_exception('assistant parts are text, python or python_output') -}}
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
    {{- '<|assistant_end|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|assistant_start|>' -}}
{%- endif -%}
""".splitlines())


def tokenizer_config(tokenizer: Tokenizer, sequence_len: int) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
            "pad_token": "<|assistant_end|>", "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": sequence_len, "chat_template": CHAT_TEMPLATE}


def generation_config(tokenizer: Tokenizer) -> dict:
    special = tokenizer.special_tokens
    return {"bos_token_id": special["<|bos|>"], "eos_token_id": [special["<|assistant_end|>"], special["<|bos|>"]],
            "pad_token_id": special["<|assistant_end|>"]}


# -----------------------------------------------------------------------------
# Export and import


def export_hf(model: GPT, tokenizer: Tokenizer, meta: dict, directory: Path) -> None:
    """Write the five files into `directory` (scripts.export stages it and renames it into place)."""
    if sys.byteorder != "little":
        raise ExportError("safetensors stores little-endian bytes; export on a little-endian machine")
    check_exportable(model, tokenizer)
    directory = Path(directory)
    names = weight_names(model.config.n_layer)
    state = {name.removeprefix("_orig_mod."): tensor for name, tensor in model.state_dict().items()}
    tensors = {names[name]: state[name] for name in names}
    metadata = {"format": "pt", "nanochat_step": str(meta.get("step")),
                "nanochat_tokenizer_fingerprint": tokenizer.fingerprint()}
    write_safetensors(directory / "model.safetensors", tensors, metadata)
    for name, content in (("config.json", hf_config(model, tokenizer)),
                          ("tokenizer.json", tokenizer_json(tokenizer)),
                          ("tokenizer_config.json", tokenizer_config(tokenizer, model.config.sequence_len)),
                          ("generation_config.json", generation_config(tokenizer))):
        atomic_write_text(directory / name, json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def load_hf_directory(path: str | Path, device: torch.device, phase: str = "eval"):
    """(model, tokenizer, meta) of a directory in transformers' NanoChat format: an ordinary nanochat GPT."""
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"--hf {path}: no such directory; pass a directory written by "
                          "`python -m scripts.export --format hf` (or downloaded from the Hub)")
    config = gpt_config_from_hf(_read_json(path / "config.json"), path / "config.json")
    tokenizer = tokenizer_from_json(_read_json(path / "tokenizer.json"), path / "tokenizer.json")
    if config.vocab_size < tokenizer.get_vocab_size():
        raise ExportError(f"{path}: the model has {config.vocab_size} token embeddings but tokenizer.json has "
                          f"{tokenizer.get_vocab_size()} tokens: {EXPORT_FIX}")
    weights_path = path / "model.safetensors"
    if not weights_path.is_file():
        raise ExportError(f"{weights_path} is missing (sharded or .bin weights are not read): {EXPORT_FIX}")
    tensors, metadata = read_safetensors(weights_path)
    state = _our_state_dict(tensors, config, weights_path)
    step = metadata.get("nanochat_step", "")
    meta = {"model_config": asdict(config), "tokenizer_fingerprint": tokenizer.fingerprint(),
            "step": int(step) if step.isdigit() else None, "name": path.resolve().name, "hf_directory": str(path)}
    try:
        model = build_model(meta, device, phase, state, source=str(weights_path))
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    return model, tokenizer, meta


def _our_state_dict(tensors: dict[str, torch.Tensor], config: GPTConfig, path: Path) -> dict[str, torch.Tensor]:
    names = weight_names(config.n_layer)
    if missing := sorted(set(names.values()) - set(tensors)):
        raise ExportError(f"{path} lacks {len(missing)} weights of the model config.json describes "
                          f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): {EXPORT_FIX}")
    if extra := sorted(set(tensors) - set(names.values())):
        raise ExportError(f"{path} holds weights nanochat's GPT has no place for ({', '.join(extra[:3])}): only "
                          "transformers' plain NanoChatForCausalLM weights are read")
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in GPT(config).state_dict().items()}
    state = {ours: tensors[theirs] for ours, theirs in names.items()}
    for name, tensor in state.items():
        if tensor.shape != shapes[name]:
            raise ExportError(f"{path}: {names[name]} has shape {list(tensor.shape)}, config.json implies "
                              f"{list(shapes[name])}: the files come from different models; {EXPORT_FIX}")
    return state


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ExportError(f"{path} is missing: a nanochat-format directory holds {', '.join(FILES)}; {EXPORT_FIX}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}): {EXPORT_FIX}") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} is not a JSON object: {EXPORT_FIX}")
    return data

