"""The BPE tokenizer and the chat format.

Training runs in Rust (rustbpe: fast pair counting over gigabytes of text); encoding and decoding run in
tiktoken (fast, threaded), built from the learned merges. The chat format lives here too: `render_conversation`
turns a conversation into token ids plus a training mask, `render_for_completion` into a prompt.

On disk a tokenizer is a directory of two files, both plain text:
  ranks.tiktoken   one token per line, "<base64 of the token's bytes> <rank>", in rank order (tiktoken's own
                   format, so `tiktoken.load.load_tiktoken_bpe` reads it too): the 256 single bytes, then the merges
  tokenizer.json   {"format_version", "pattern", "special_tokens": {name: id}, "vocab_size", "fingerprint"}
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import tiktoken
import torch

from nanochat.common import atomic_write_text, get_base_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, forced into the stream
]

# GPT-4's split pattern, except numbers split into runs of at most 2 digits (GPT-4: 3), which spends fewer
# merges on numbers in a small vocabulary.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

RANKS_FILE = "ranks.tiktoken"
CONFIG_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"
FORMAT_VERSION = 1


class Tokenizer:
    """Byte-level BPE over `pattern`-split chunks; special tokens take the ids right after the merges."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN):
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        offset = len(mergeable_ranks)
        self.special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special_tokens)
        self._fingerprint: str | None = None

    # -------------------------------------------------------------------------
    # Training, saving, loading

    @classmethod
    def train_from_iterator(cls, text_iterator: Iterable[str], vocab_size: int) -> Tokenizer:
        """Learn `vocab_size - len(SPECIAL_TOKENS)` byte tokens + merges from the texts. If the text runs out of
        pairs to merge first, the vocabulary is smaller than asked; get_vocab_size() says what it is."""
        min_vocab = 256 + len(SPECIAL_TOKENS)
        if vocab_size < min_vocab:
            raise ValueError(f"vocab_size={vocab_size} is too small: it must be at least {min_vocab} "
                             f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)")
        try:  # imported here so encoding with a saved tokenizer never needs the Rust extension
            from rustbpe import Tokenizer as RustTrainer
        except ImportError as e:
            raise ImportError("the rustbpe extension is not built: run `pip install -e .` in the repo root "
                              "(needs a Rust toolchain)") from e
        trainer = RustTrainer()
        trainer.train_from_iterator(iter(text_iterator), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        return cls(ranks, trainer.get_pattern())

    def save(self, path: str | Path) -> None:
        """Write the directory (ranks first, then the config that names their fingerprint), each file atomically."""
        path = Path(path)
        ranks_lines = [f"{base64.b64encode(token).decode('ascii')} {rank}"
                       for token, rank in sorted(self.mergeable_ranks.items(), key=lambda item: item[1])]
        atomic_write_text(path / RANKS_FILE, "\n".join(ranks_lines) + "\n")
        config = {
            "format_version": FORMAT_VERSION,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab_size": self.get_vocab_size(),
            "fingerprint": self.fingerprint(),
        }
        atomic_write_text(path / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_directory(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        config_path, ranks_path = path / CONFIG_FILE, path / RANKS_FILE
        for file in (config_path, ranks_path):
            if not file.is_file():
                raise FileNotFoundError(f"tokenizer file {file} is missing: train one with "
                                        f"`python -m scripts.tok_train` (it writes {path})")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            pattern, special_tokens = config["pattern"], config["special_tokens"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{config_path} is corrupt ({e}): retrain with `python -m scripts.tok_train`") from e
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path} has format_version {config.get('format_version')!r}, this code reads "
                             f"{FORMAT_VERSION}: retrain with `python -m scripts.tok_train`")
        ranks = _read_ranks(ranks_path)
        if list(special_tokens) != SPECIAL_TOKENS:
            raise ValueError(f"{config_path} lists special tokens {list(special_tokens)}, this code expects "
                             f"{SPECIAL_TOKENS}: retrain with `python -m scripts.tok_train`")
        tokenizer = cls(ranks, pattern)
        if tokenizer.special_tokens != special_tokens or tokenizer.fingerprint() != config.get("fingerprint"):
            raise ValueError(f"{path} is inconsistent: {RANKS_FILE} does not match the fingerprint in {CONFIG_FILE} "
                             "(a partial copy?): retrain with `python -m scripts.tok_train`")
        return tokenizer

    def fingerprint(self) -> str:
        """A stable hash of everything that decides the ids (ranks, specials, pattern); checkpoints store it so a
        model is never paired with a different tokenizer."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps({"pattern": self.pattern, "special_tokens": self.special_tokens}).encode("utf-8"))
            for token, _rank in sorted(self.mergeable_ranks.items(), key=lambda item: item[1]):
                h.update(len(token).to_bytes(4, "little") + token)  # length prefix: concatenations stay unambiguous
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # -------------------------------------------------------------------------
    # Vocabulary

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> set[str]:
        return set(self.special_tokens)

    def get_bos_token_id(self) -> int:
        return self.special_tokens["<|bos|>"]

    def encode_special(self, name: str) -> int:
        if name not in self.special_tokens:
            raise ValueError(f"{name!r} is not a special token; the special tokens are {SPECIAL_TOKENS}")
        return self.special_tokens[name]

    def id_to_token(self, token_id: int) -> str:
        """The token's text (special tokens by name); a token that is part of a multi-byte character decodes
        with U+FFFD replacement characters."""
        return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes per token id, 0 for special tokens (they are not text): the denominator of bits per byte."""
        lengths = [0] * self.get_vocab_size()
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return lengths

    # -------------------------------------------------------------------------
    # Encoding and decoding

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Token ids of a text, or of each text of a list (encoded on `num_threads` threads). Special tokens are
        only ever added through prepend/append (an id or a name): "<|bos|>" inside the text is plain bytes."""
        prefix = [self._token_id(prepend)] if prepend is not None else []
        suffix = [self._token_id(append)] if append is not None else []
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text) + suffix
        if isinstance(text, list) and all(isinstance(t, str) for t in text):
            return [prefix + ids + suffix for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]
        raise TypeError(f"encode takes a str or a list of str, got {type(text).__name__}")

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token: possibly part of a multi-byte character, which decode() would replace."""
        return self.enc.decode_single_token_bytes(token_id)

    def _token_id(self, token: int | str) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int) and 0 <= token < self.get_vocab_size():
            return token
        raise ValueError(f"prepend/append must be a special token name or a token id in [0, "
                         f"{self.get_vocab_size()}), got {token!r}")

    # -------------------------------------------------------------------------
    # Chat format (see render_conversation)

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and a mask (1 = the model is trained to predict this token):
        <|bos|>, then per message
          user       <|user_start|> text <|user_end|>                                   mask 0
          assistant  <|assistant_start|> (mask 0), content (mask 1), <|assistant_end|> (mask 1)
        where assistant content is a str or parts: text (mask 1), python -> <|python_start|> code <|python_end|>
        (mask 1), python_output -> <|output_start|> output <|output_end|> (mask 0: the tool wrote it, not the model).
        A leading system message is merged into the first user message. Truncated to max_tokens."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        ids, mask = self._render(validate_conversation(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """A prompt for the assistant's next turn: the conversation without its final assistant message (if it has
        one), ending with <|assistant_start|>."""
        messages = validate_conversation(conversation)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _mask = self._render(messages)
        return ids + [self.encode_special("<|assistant_start|>")]

    def _render(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []

        def add(token_ids: int | list[int], supervised: int) -> None:
            token_ids = [token_ids] if isinstance(token_ids, int) else token_ids
            ids.extend(token_ids)
            mask.extend([supervised] * len(token_ids))

        special = self.special_tokens
        add(special["<|bos|>"], 0)
        for message in messages:
            content = message["content"]
            if message["role"] == "user":
                add(special["<|user_start|>"], 0)
                add(self.encode(content), 0)
                add(special["<|user_end|>"], 0)
                continue
            add(special["<|assistant_start|>"], 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    add(self.encode(part["text"]), 1)
                elif part["type"] == "python":
                    add(special["<|python_start|>"], 1)
                    add(self.encode(part["text"]), 1)
                    add(special["<|python_end|>"], 1)
                else:  # python_output
                    add(special["<|output_start|>"], 0)
                    add(self.encode(part["text"]), 0)
                    add(special["<|output_end|>"], 0)
            add(special["<|assistant_end|>"], 1)
        return ids, mask


# -----------------------------------------------------------------------------
# Conversation validation: the one boundary every chat dataset and the web API pass through

PART_TYPES = ("text", "python", "python_output")


def validate_conversation(conversation: dict) -> list[dict]:
    """The messages to render: checked, with a leading system message merged into the first user message.
    Raises ValueError naming the offending message index and the fix."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('a conversation is {"messages": [{"role": ..., "content": ...}, ...]} with at least one '
                         f"message; got {_short(conversation)}")
    for index, message in enumerate(messages):
        _validate_message(index, message)

    rendered = copy.deepcopy(messages)
    offset = 0  # rendered[i] is messages[i + offset]
    if rendered[0]["role"] == "system":
        if len(rendered) < 2 or rendered[1]["role"] != "user":
            raise ValueError("message 0 is a system message, so message 1 must be a user message "
                             "(the system prompt is merged into it): add the user turn after it")
        rendered[1]["content"] = rendered[0]["content"] + "\n\n" + rendered[1]["content"]
        rendered, offset = rendered[1:], 1

    for i, message in enumerate(rendered):
        index, role = i + offset, message["role"]
        expected = "user" if i % 2 == 0 else "assistant"
        if role == "system":
            raise ValueError(f"message {index} is a system message, but only the first message may be one: "
                             "move it to the start or merge it into a user message")
        if role != expected:
            previous = f"message {index - 1} is also {role}" if i > 0 else f"a conversation starts with {expected}"
            raise ValueError(f"message {index} has role {role!r} but {expected!r} was expected ({previous}): "
                             "messages must alternate user/assistant starting with user; merge consecutive turns")
    return rendered


def _validate_message(index: int, message: dict) -> None:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f'message {index} must be a dict with "role" and "content", got {_short(message)}')
    role, content = message["role"], message["content"]
    if role not in ("system", "user", "assistant"):
        raise ValueError(f"message {index} has unknown role {role!r}: use 'system', 'user' or 'assistant'")
    if isinstance(content, str):
        if not content:
            raise ValueError(f"message {index} ({role}) has empty content: drop the message or give it text")
        return
    if role != "assistant" or not isinstance(content, list):
        raise ValueError(f"message {index} ({role}) content must be a str"
                         + (" or a list of parts" if role == "assistant" else "")
                         + f", got {type(content).__name__}")
    if not content:
        raise ValueError(f"message {index} (assistant) has an empty list of parts: give it at least one part")
    for part_index, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
            raise ValueError(f"message {index} part {part_index} must be {{\"type\": one of {list(PART_TYPES)}, "
                             f"\"text\": str}}, got {_short(part)}")


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(path.read_text(encoding="ascii").splitlines(), start=1):
        try:
            token_b64, rank = line.split()
            token, rank = base64.b64decode(token_b64, validate=True), int(rank)
        except ValueError as e:
            raise ValueError(f"{path} line {line_number} is not '<base64> <rank>' ({e}): "
                             "retrain with `python -m scripts.tok_train`") from e
        if rank != len(ranks) or token in ranks:
            raise ValueError(f"{path} line {line_number}: ranks must be 0, 1, 2, ... with distinct tokens: "
                             "retrain with `python -m scripts.tok_train`")
        ranks[token] = rank
    if len(ranks) < 256:
        raise ValueError(f"{path} holds {len(ranks)} tokens, fewer than the 256 single bytes: "
                         "retrain with `python -m scripts.tok_train`")
    return ranks


# -----------------------------------------------------------------------------
# The trained tokenizer of this run ($NANOCHAT_BASE_DIR/tokenizer)


def get_tokenizer() -> Tokenizer:
    return Tokenizer.from_directory(get_base_dir() / "tokenizer")


def get_token_bytes(device: str | torch.device = "cpu") -> torch.Tensor:
    """(vocab_size,) int64 UTF-8 bytes per token, 0 for special tokens; written by scripts.tok_train."""
    tokenizer_dir = get_base_dir() / "tokenizer"
    path = tokenizer_dir / TOKEN_BYTES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train the tokenizer with `python -m scripts.tok_train`")
    token_bytes = torch.load(path, map_location=device)
    config_path = tokenizer_dir / CONFIG_FILE
    if config_path.is_file():  # cheap guard against a token_bytes.pt left over from another tokenizer
        vocab_size = json.loads(config_path.read_text(encoding="utf-8")).get("vocab_size")
        if vocab_size is not None and token_bytes.numel() != vocab_size:
            raise ValueError(f"{path} has {token_bytes.numel()} entries but the tokenizer has {vocab_size} tokens: "
                             "rerun `python -m scripts.tok_train`")
    return token_bytes
