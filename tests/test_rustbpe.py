"""The Rust BPE trainer (`rustbpe`) from Python: what it learns, how it encodes, and how it refuses bad input."""

from __future__ import annotations

import itertools

import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

import rustbpe
from nanochat.tokenizer import SPLIT_PATTERN

VOCAB_SIZE = 600
EXTRA_TEXT = ("It's 2024: we'll see 1234567 cafés, naïve Straße, Привет, 你好世界 🙂.\r\n\r\n"
              "\tindented   spaces    and\n\n\nnewlines ... !!! ???")


@pytest.fixture(scope="module")
def texts(mirror_texts) -> list[str]:
    return [text[:3000] for text in mirror_texts[:200]] + [EXTRA_TEXT] * 5


@pytest.fixture(scope="module")
def trained(texts) -> rustbpe.Tokenizer:
    tokenizer = rustbpe.Tokenizer()
    tokenizer.train_from_iterator(iter(texts), VOCAB_SIZE)
    return tokenizer


def reference_encode(text: str, ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN) -> list[int]:
    """Plain BPE: split with the pattern, then in each chunk merge the adjacent pair whose joined bytes have the
    lowest rank (the earliest merge), until no adjacent pair joins into a token."""
    ids = []
    for chunk in regex.findall(pattern, text):
        parts = [bytes([b]) for b in chunk.encode()]
        while len(parts) > 1:
            candidates = [(ranks.get(parts[i] + parts[i + 1], float("inf")), i) for i in range(len(parts) - 1)]
            rank, i = min(candidates)
            if rank == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[part] for part in parts)
    return ids


def ranks_of(tokenizer: rustbpe.Tokenizer) -> dict[bytes, int]:
    return {bytes(token): rank for token, rank in tokenizer.get_mergeable_ranks()}


# -----------------------------------------------------------------------------
# What training learns


def test_ranks_are_the_256_bytes_then_one_token_per_merge(trained):
    ranks = trained.get_mergeable_ranks()
    assert [rank for _, rank in ranks] == list(range(VOCAB_SIZE))
    assert [token for token, _ in ranks[:256]] == [bytes([b]) for b in range(256)]
    assert all(len(token) >= 2 for token, _ in ranks[256:])
    assert len({token for token, _ in ranks}) == VOCAB_SIZE  # every token's bytes are distinct


def test_each_merged_token_joins_two_earlier_tokens(trained):
    ranks = ranks_of(trained)
    for token, rank in ranks.items():
        if rank >= 256:
            splits = [(token[:i], token[i:]) for i in range(1, len(token))]
            assert any(ranks.get(left, rank) < rank and ranks.get(right, rank) < rank for left, right in splits), token


def test_the_first_merge_is_the_most_frequent_pair(texts, trained):
    counts: dict[bytes, int] = {}
    for text in texts:
        for chunk in regex.findall(SPLIT_PATTERN, text):
            data = chunk.encode()
            for i in range(len(data) - 1):
                counts[data[i:i + 2]] = counts.get(data[i:i + 2], 0) + 1
    # highest count, ties to the smallest pair of byte values
    best = min(counts, key=lambda pair: (-counts[pair], pair))
    assert trained.get_mergeable_ranks()[256] == (best, 256)


def test_training_is_deterministic_and_independent_of_batching(texts, trained):
    again = rustbpe.Tokenizer()
    again.train_from_iterator(iter(texts), VOCAB_SIZE, buffer_size=7)
    assert again.get_mergeable_ranks() == trained.get_mergeable_ranks()


def test_training_accepts_any_iterable_of_str(texts, trained):
    from_generator = rustbpe.Tokenizer()
    from_generator.train_from_iterator((text for text in texts), VOCAB_SIZE, buffer_size=1)
    assert from_generator.get_mergeable_ranks() == trained.get_mergeable_ranks()


def test_a_text_with_few_pairs_gives_a_smaller_vocabulary():
    tokenizer = rustbpe.Tokenizer()
    tokenizer.train_from_iterator(["ab ab ab"], 1000)
    assert [token for token, _ in tokenizer.get_mergeable_ranks()[256:]] == [b"ab", b" ab"]


# -----------------------------------------------------------------------------
# Encoding


def test_encode_matches_reference_bpe_and_tiktoken_on_real_text(texts, trained):
    ranks = ranks_of(trained)
    encoding = tiktoken.Encoding(name="test", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    for text in texts[:40] + [EXTRA_TEXT]:
        ids = trained.encode(text)
        assert ids == reference_encode(text, ranks)
        assert ids == encoding.encode_ordinary(text)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_encode_round_trips_and_matches_tiktoken_on_any_text(trained, text):
    ranks = ranks_of(trained)
    token_bytes = {rank: token for token, rank in ranks.items()}
    ids = trained.encode(text)
    assert b"".join(token_bytes[i] for i in ids) == text.encode()
    encoding = tiktoken.Encoding(name="test", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})
    assert ids == encoding.encode_ordinary(text)


def test_an_untrained_tokenizer_encodes_bytes():
    assert rustbpe.Tokenizer().encode("hé!") == list("hé!".encode())


# -----------------------------------------------------------------------------
# The split pattern


def test_default_pattern_is_nanochats_split_pattern(trained):
    assert rustbpe.Tokenizer().get_pattern() == SPLIT_PATTERN
    assert trained.get_pattern() == SPLIT_PATTERN


def test_a_custom_pattern_is_kept_and_used_for_training_and_encoding(texts):
    pattern = r"\w+|\s+|[^\w\s]+"
    tokenizer = rustbpe.Tokenizer()
    tokenizer.train_from_iterator(iter(texts[:50]), 400, pattern=pattern)
    assert tokenizer.get_pattern() == pattern
    ranks = ranks_of(tokenizer)
    # with this pattern a space never joins the word after it
    assert not any(token.startswith(b" ") and token.strip().isalpha() for token in ranks)
    for text in texts[:10]:
        assert tokenizer.encode(text) == reference_encode(text, ranks, pattern)


# -----------------------------------------------------------------------------
# Bad input raises a clear Python exception and leaves the tokenizer as it was


@pytest.mark.parametrize("vocab_size", [0, 255, -1])
def test_a_vocab_below_256_is_a_value_error(vocab_size):
    with pytest.raises(ValueError, match="vocab_size must be at least 256"):
        rustbpe.Tokenizer().train_from_iterator(["hello world"], vocab_size)


def test_a_non_str_item_is_a_type_error_naming_the_item():
    with pytest.raises(TypeError, match="item 1 of the iterator is a bytes, expected str"):
        rustbpe.Tokenizer().train_from_iterator(iter(["fine", b"bytes", "fine"]), 300)


def test_a_non_iterable_is_a_type_error():
    with pytest.raises(TypeError, match="iterable of str"):
        rustbpe.Tokenizer().train_from_iterator(42, 300)


def test_an_invalid_pattern_is_a_value_error():
    with pytest.raises(ValueError, match="invalid split pattern"):
        rustbpe.Tokenizer().train_from_iterator(["hello"], 300, pattern="(unclosed")


def test_a_buffer_size_below_one_is_a_value_error():
    with pytest.raises(ValueError, match="buffer_size must be at least 1"):
        rustbpe.Tokenizer().train_from_iterator(["hello"], 300, buffer_size=0)


def test_an_error_raised_by_the_iterator_propagates_and_leaves_the_tokenizer_unchanged(trained):
    def failing():
        yield from itertools.repeat("some text", 20)
        raise RuntimeError("the data loader broke")

    before = trained.get_mergeable_ranks()
    with pytest.raises(RuntimeError, match="the data loader broke"):
        trained.train_from_iterator(failing(), 300, buffer_size=4)
    assert trained.get_mergeable_ranks() == before
