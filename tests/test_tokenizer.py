"""The tokenizer: training, its directory format, encoding/decoding, and the chat format."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanochat.tokenizer import (
    CONFIG_FILE,
    RANKS_FILE,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    TOKEN_BYTES_FILE,
    Tokenizer,
    get_token_bytes,
    get_tokenizer,
)

SAMPLE = "The quick brown fox jumps over 13 lazy dogs.\n\n    def f(x):\n        return x ** 2  # 你好, 안녕, Grüße 🙂"

# plain text, with the special tokens' spellings mixed in as ordinary characters
text_with_special_spellings = st.lists(st.one_of(st.text(max_size=40), st.sampled_from(SPECIAL_TOKENS)),
                                       max_size=8).map("".join)


def num_ordinary(tokenizer: Tokenizer) -> int:
    return tokenizer.get_vocab_size() - len(SPECIAL_TOKENS)


# -----------------------------------------------------------------------------
# Training and the directory format


def test_vocab_size_counts_the_special_tokens_which_come_after_the_merges_in_order(tiny_tokenizer):
    assert tiny_tokenizer.get_vocab_size() == 512
    first_special = 512 - len(SPECIAL_TOKENS)
    assert [tiny_tokenizer.encode_special(name) for name in SPECIAL_TOKENS] == list(range(first_special, 512))
    assert tiny_tokenizer.get_bos_token_id() == first_special
    assert tiny_tokenizer.get_special_tokens() == set(SPECIAL_TOKENS)
    assert tiny_tokenizer.id_to_token(first_special) == "<|bos|>"


def test_training_learns_merges_that_compress_text(tiny_tokenizer):
    ids = tiny_tokenizer.encode("The function returns the value of the module.")
    assert len(ids) < len("The function returns the value of the module.") / 2


def test_training_is_deterministic(mirror_texts):
    texts = [text[:2000] for text in mirror_texts[:50]]
    first = Tokenizer.train_from_iterator(texts, vocab_size=300)
    second = Tokenizer.train_from_iterator(iter(texts), vocab_size=300)
    assert first.get_vocab_size() == 300
    assert first.fingerprint() == second.fingerprint()


def test_tiktoken_encodes_exactly_like_the_rust_trainer(mirror_texts):
    import rustbpe

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter([text[:2000] for text in mirror_texts[:50]]), 300, pattern=SPLIT_PATTERN)
    tokenizer = Tokenizer({bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}, trainer.get_pattern())
    for text in [*mirror_texts[50:70], SAMPLE]:
        assert tokenizer.encode(text) == trainer.encode(text)


def test_training_rejects_a_vocab_too_small_for_bytes_and_specials():
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train_from_iterator(["hello world"], vocab_size=264)


def test_save_and_load_round_trip_gives_the_same_ids_and_fingerprint(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted([CONFIG_FILE, RANKS_FILE])
    loaded = Tokenizer.from_directory(tmp_path / "tok")
    assert loaded.fingerprint() == tiny_tokenizer.fingerprint()
    assert loaded.get_vocab_size() == tiny_tokenizer.get_vocab_size()
    assert loaded.encode(SAMPLE) == tiny_tokenizer.encode(SAMPLE)
    assert loaded.render_conversation(CONVERSATION) == tiny_tokenizer.render_conversation(CONVERSATION)


def test_ranks_file_is_readable_by_tiktoken(tiny_tokenizer, tmp_path):
    from tiktoken.load import load_tiktoken_bpe

    tiny_tokenizer.save(tmp_path / "tok")
    assert load_tiktoken_bpe(str(tmp_path / "tok" / RANKS_FILE)) == tiny_tokenizer.mergeable_ranks


def test_fingerprint_changes_with_the_merges(tiny_tokenizer):
    ranks = dict(tiny_tokenizer.mergeable_ranks)
    last_token = max(ranks, key=ranks.get)
    del ranks[last_token]
    assert Tokenizer(ranks, tiny_tokenizer.pattern).fingerprint() != tiny_tokenizer.fingerprint()


def test_loading_a_missing_directory_says_how_to_train_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        Tokenizer.from_directory(tmp_path / "nowhere")


def test_loading_corrupt_ranks_names_the_file(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    ranks_path = tmp_path / RANKS_FILE
    ranks_path.write_text(ranks_path.read_text() + "not-base64!! 999\n")
    with pytest.raises(ValueError, match=RANKS_FILE):
        Tokenizer.from_directory(tmp_path)


def test_loading_ranks_that_disagree_with_the_fingerprint_fails(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    ranks_path = tmp_path / RANKS_FILE
    ranks_path.write_text("\n".join(ranks_path.read_text().splitlines()[:-1]) + "\n")  # drop the last merge
    with pytest.raises(ValueError, match="fingerprint"):
        Tokenizer.from_directory(tmp_path)


def test_get_tokenizer_and_token_bytes_read_the_base_dir(tiny_tokenizer, base_dir):
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        get_tokenizer()
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        get_token_bytes()
    tiny_tokenizer.save(base_dir / "tokenizer")
    torch.save(torch.tensor(tiny_tokenizer.token_byte_lengths()), base_dir / "tokenizer" / TOKEN_BYTES_FILE)
    assert get_tokenizer().fingerprint() == tiny_tokenizer.fingerprint()
    token_bytes = get_token_bytes()
    assert token_bytes.shape == (512,) and token_bytes.dtype == torch.int64


def test_get_token_bytes_rejects_a_file_from_another_tokenizer(tiny_tokenizer, base_dir):
    tiny_tokenizer.save(base_dir / "tokenizer")
    torch.save(torch.ones(1000, dtype=torch.int64), base_dir / "tokenizer" / TOKEN_BYTES_FILE)
    with pytest.raises(ValueError, match="1000 entries"):
        get_token_bytes()


def test_token_bytes_count_the_utf8_bytes_of_each_token_and_zero_for_specials(tiny_tokenizer):
    lengths = tiny_tokenizer.token_byte_lengths()
    assert lengths[num_ordinary(tiny_tokenizer):] == [0] * len(SPECIAL_TOKENS)
    assert lengths[:256] == [1] * 256
    ids = tiny_tokenizer.encode(SAMPLE)
    assert sum(lengths[i] for i in ids) == len(SAMPLE.encode("utf-8"))


def test_saved_config_is_plain_json(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["vocab_size"] == 512
    assert list(config["special_tokens"]) == SPECIAL_TOKENS
    assert config["fingerprint"] == tiny_tokenizer.fingerprint()


# -----------------------------------------------------------------------------
# Encoding and decoding


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_decode_inverts_encode_on_any_unicode(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(text=text_with_special_spellings)
def test_special_tokens_are_never_produced_from_plain_text(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text)
    assert all(i < num_ordinary(tiny_tokenizer) for i in ids)
    assert tiny_tokenizer.decode(ids) == text


def test_bos_spelled_in_text_encodes_as_ordinary_bytes(tiny_tokenizer):
    ids = tiny_tokenizer.encode("<|bos|>")
    assert tiny_tokenizer.get_bos_token_id() not in ids
    assert len(ids) > 1


def test_prepend_and_append_take_a_special_name_or_an_id(tiny_tokenizer):
    body = tiny_tokenizer.encode("hello world")
    bos, end = tiny_tokenizer.get_bos_token_id(), tiny_tokenizer.encode_special("<|assistant_end|>")
    assert tiny_tokenizer.encode("hello world", prepend="<|bos|>") == [bos, *body]
    assert tiny_tokenizer.encode("hello world", prepend=bos, append=end) == [bos, *body, end]
    assert tiny_tokenizer.encode("hello world", append="<|assistant_end|>") == [*body, end]
    assert tiny_tokenizer.encode(["a", "b"], prepend=bos) == [[bos, *tiny_tokenizer.encode("a")],
                                                             [bos, *tiny_tokenizer.encode("b")]]


def test_batch_encoding_equals_encoding_each_item(tiny_tokenizer, mirror_texts):
    texts = [*mirror_texts[:40], "", "<|bos|>", SAMPLE]
    assert tiny_tokenizer.encode(texts, num_threads=2) == [tiny_tokenizer.encode(text) for text in texts]


@pytest.mark.parametrize("kwargs, match", [
    ({"prepend": "<|nope|>"}, "not a special token"),
    ({"append": 512}, "token id"),
    ({"prepend": -1}, "token id"),
])
def test_encode_rejects_unknown_prepend_or_append(tiny_tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_tokenizer.encode("hi", **kwargs)


def test_encode_rejects_what_is_not_text(tiny_tokenizer):
    with pytest.raises(TypeError, match="str or a list of str"):
        tiny_tokenizer.encode(b"bytes")


# -----------------------------------------------------------------------------
# Chat format

CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "print(2+3)"},
        {"type": "python_output", "text": "5"},
        {"type": "text", "text": "It is 5."},
    ]},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
]}


def segments(tokenizer: Tokenizer, ids: list[int], mask: list[int]) -> list[tuple[str, int]]:
    """Readable layout: each special token alone, runs of ordinary tokens with the same mask decoded together."""
    first_special = num_ordinary(tokenizer)
    out: list[tuple[list[int], int]] = []
    for token, supervised in zip(ids, mask):
        if token < first_special and out and out[-1][0][-1] < first_special and out[-1][1] == supervised:
            out[-1][0].append(token)
        else:
            out.append(([token], supervised))
    return [(tokenizer.decode(run), supervised) for run, supervised in out]


def test_render_conversation_layout_and_mask(tiny_tokenizer):
    ids, mask = tiny_tokenizer.render_conversation(CONVERSATION)
    assert segments(tiny_tokenizer, ids, mask) == [
        ("<|bos|>", 0),
        ("<|user_start|>", 0), ("Be brief.\n\nWhat is 2+3?", 0), ("<|user_end|>", 0),
        ("<|assistant_start|>", 0),
        ("Let me compute.", 1),
        ("<|python_start|>", 1), ("print(2+3)", 1), ("<|python_end|>", 1),
        ("<|output_start|>", 0), ("5", 0), ("<|output_end|>", 0),
        ("It is 5.", 1),
        ("<|assistant_end|>", 1),
        ("<|user_start|>", 0), ("Thanks", 0), ("<|user_end|>", 0),
        ("<|assistant_start|>", 0), ("You're welcome.", 1), ("<|assistant_end|>", 1),
    ]


def test_render_conversation_encodes_each_piece_separately(tiny_tokenizer):
    tok = tiny_tokenizer
    conversation = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]}
    ids, mask = tok.render_conversation(conversation)
    special = tok.encode_special
    user, reply = tok.encode("Hi there"), tok.encode("Hello!")
    assert ids == [special("<|bos|>"), special("<|user_start|>"), *user, special("<|user_end|>"),
                   special("<|assistant_start|>"), *reply, special("<|assistant_end|>")]
    assert mask == [0, 0, *[0] * len(user), 0, 0, *[1] * len(reply), 1]


def test_render_conversation_truncates_to_max_tokens(tiny_tokenizer):
    full_ids, full_mask = tiny_tokenizer.render_conversation(CONVERSATION)
    ids, mask = tiny_tokenizer.render_conversation(CONVERSATION, max_tokens=10)
    assert (ids, mask) == (full_ids[:10], full_mask[:10])
    with pytest.raises(ValueError, match="max_tokens"):
        tiny_tokenizer.render_conversation(CONVERSATION, max_tokens=0)


def test_render_conversation_leaves_the_input_unchanged(tiny_tokenizer):
    before = json.dumps(CONVERSATION)
    tiny_tokenizer.render_conversation(CONVERSATION)
    tiny_tokenizer.render_for_completion(CONVERSATION)
    assert json.dumps(CONVERSATION) == before


def test_render_for_completion_drops_the_last_answer_and_opens_a_new_one(tiny_tokenizer):
    ids = tiny_tokenizer.render_for_completion(CONVERSATION)
    full_ids, _ = tiny_tokenizer.render_conversation(CONVERSATION, max_tokens=10_000)
    last_answer = 2 + len(tiny_tokenizer.encode("You're welcome."))  # + assistant_start/end
    assert ids == full_ids[:-last_answer] + [tiny_tokenizer.encode_special("<|assistant_start|>")]


def test_render_for_completion_accepts_a_conversation_ending_with_the_user(tiny_tokenizer):
    prompt = {"messages": CONVERSATION["messages"][:-1]}
    assert tiny_tokenizer.render_for_completion(prompt) == tiny_tokenizer.render_for_completion(CONVERSATION)


def user(text: str = "hi") -> dict:
    return {"role": "user", "content": text}


def assistant(content: str | list = "hello") -> dict:
    return {"role": "assistant", "content": content}


@pytest.mark.parametrize("conversation, match", [
    ({}, "at least one message"),
    ({"messages": []}, "at least one message"),
    ("not a dict", "at least one message"),
    ({"messages": [{"role": "robot", "content": "beep"}]}, r"message 0 has unknown role 'robot'"),
    ({"messages": [user(), user()]}, r"message 1 has role 'user' but 'assistant' was expected"),
    ({"messages": [assistant()]}, r"message 0 has role 'assistant' but 'user' was expected"),
    ({"messages": [user(), assistant(), assistant()]}, r"message 2 has role 'assistant'"),
    ({"messages": [user(""), assistant()]}, r"message 0 \(user\) has empty content"),
    ({"messages": [user(), assistant("")]}, r"message 1 \(assistant\) has empty content"),
    ({"messages": [user(), assistant([])]}, r"message 1 \(assistant\) has an empty list of parts"),
    ({"messages": [user(), assistant(), {"role": "system", "content": "late"}]},
     r"message 2 is a system message, but only the first"),
    ({"messages": [{"role": "system", "content": "sys"}]}, "message 1 must be a user message"),
    ({"messages": [{"role": "system", "content": "sys"}, assistant()]}, "message 1 must be a user message"),
    ({"messages": [user(), assistant([{"type": "image", "text": "x"}])]}, r"message 1 part 0 must be"),
    ({"messages": [user(), assistant([{"type": "text", "text": "a"}, {"type": "python"}])]}, r"message 1 part 1"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     r"message 0 \(user\) content must be a str"),
    ({"messages": [user(), {"role": "assistant"}]}, r'message 1 must be a dict with "role" and "content"'),
])
def test_malformed_conversations_raise_a_clear_error(tiny_tokenizer, conversation, match):
    with pytest.raises(ValueError, match=match):
        tiny_tokenizer.render_conversation(conversation)
    with pytest.raises(ValueError, match=match):
        tiny_tokenizer.render_for_completion(conversation)
