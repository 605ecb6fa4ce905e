"""best_fit packing: rows that start at a document's BOS, filled with whole documents where one fits, and a resume
that is exact."""

from __future__ import annotations

import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import dataloader
from nanochat.dataloader import BestFitPacker, DistributedTokenLoader
from nanochat.dataset import RowGroupPosition, shard_name

BOS = 0


@pytest.fixture
def varied_shards(tmp_path, mirror_texts, monkeypatch):
    """Real documents of many lengths (some longer than a row) in row groups of 4, and a buffer of 10 documents, so
    a few batches cross row-group, shard and epoch boundaries and the buffer spans several row groups."""
    monkeypatch.setattr(dataloader, "BEST_FIT_BUFFER_DOCS", 10)
    texts = [text[:(53 * i) % 420 + 10] for i, text in enumerate(mirror_texts[:36])]
    for i, chunk in enumerate((texts[:16], texts[16:32], texts[32:])):
        pq.write_table(pa.table({"text": chunk}), tmp_path / shard_name(i), row_group_size=4)
    return tmp_path, texts[:32]


def best_fit_loader(tokenizer, data_dir, **kwargs) -> DistributedTokenLoader:
    return DistributedTokenLoader(tokenizer, 2, 64, "train", data_dir=data_dir, packing="best_fit",
                                  tokenizer_threads=2, **kwargs)


def split_at_bos(row: list[int], bos: int) -> list[list[int]]:
    starts = [i for i, token in enumerate(row) if token == bos]
    return [row[start:end] for start, end in zip(starts, starts[1:] + [len(row)])]


# -----------------------------------------------------------------------------
# The packer, on documents whose lengths say what best fit must do


def packer_over(lengths: list[int], row_len: int, buffer_docs: int = 1) -> BestFitPacker:
    """A packer whose first row group holds documents of `lengths` (document i is [BOS, i+1, i+1, ...]), then row
    groups of one document of 99s longer than any row; by default it tops up only when the buffer is empty."""
    docs = [[BOS] + [i + 1] * (length - 1) for i, length in enumerate(lengths)]
    later = ((RowGroupPosition(0, 0, g), [[BOS] + [99] * 4 * row_len]) for g in itertools.count(1))
    groups = itertools.chain([(RowGroupPosition(0, 0, 0), docs)], later)
    return BestFitPacker(row_len, lambda: next(groups), buffer_docs)


def test_each_row_takes_the_longest_document_that_fits_the_space_left():
    packer = packer_over([5, 3, 2, 7, 4, 1], row_len=8)
    rows = packer.next_rows(3).tolist()
    # row 1: 7 (longest), then 1 fills it; row 2: 5, then 3; row 3: 4, then 2, then nothing fits the 2 left
    assert [[len(piece) for piece in split_at_bos(row, BOS)] for row in rows[:2]] == [[7, 1], [5, 3]]
    assert split_at_bos(rows[2], BOS)[:2] == [[BOS, 5, 5, 5], [BOS, 3]]


def test_a_document_is_cut_only_when_no_whole_one_fits_and_then_the_shortest():
    packer = packer_over([6, 5, 4], row_len=8)
    row = packer.next_rows(1)[0].tolist()
    # 6 fits, then 2 tokens are left and no document fits: the shortest (4 tokens) loses 2, the 5-token one would 3
    assert row == [BOS, 1, 1, 1, 1, 1, BOS, 3]
    assert packer.tokens_discarded == 2


def test_a_document_longer_than_a_row_fills_one_row_and_its_rest_is_dropped():
    packer = packer_over([3, 20, 2], row_len=8)
    first = packer.next_rows(1)[0].tolist()
    assert first == [BOS] + [2] * 7  # the head fills the row exactly; best fit takes it before anything shorter
    assert packer.tokens_discarded == 12
    assert split_at_bos(packer.next_rows(1)[0].tolist(), BOS)[:2] == [[BOS, 1, 1], [BOS, 3]]


# -----------------------------------------------------------------------------
# The loader, on real documents


def test_rows_start_with_bos_and_hold_whole_documents_but_for_a_last_cut_piece(tiny_tokenizer, varied_shards):
    data_dir, texts = varied_shards
    bos = tiny_tokenizer.get_bos_token_id()
    documents = [tiny_tokenizer.encode(text, prepend=bos) for text in texts]
    whole = {tuple(doc) for doc in documents}
    loader = best_fit_loader(tiny_tokenizer, data_dir)
    cut_pieces = 0
    for _ in range(20):
        inputs, targets = next(loader)
        assert inputs.shape == targets.shape == (2, 64) and inputs.dtype == torch.int64
        assert inputs.is_contiguous() and targets.is_contiguous()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # every position predicts its row's next token
        for row in torch.cat([inputs, targets[:, -1:]], dim=1).tolist():
            assert row[0] == bos
            *complete, last = split_at_bos(row, bos)
            assert all(tuple(piece) in whole for piece in complete)
            if tuple(last) not in whole:  # the one cut piece a row may end with: a document's start
                cut_pieces += 1
                assert any(doc[:len(last)] == last for doc in documents)
    assert cut_pieces > 0
    loader.close()


def test_every_token_taken_in_is_packed_discarded_or_still_buffered(tiny_tokenizer, tmp_path):
    """The discarded share, measured on the mirror's first shard (row groups of 512 documents) at T=512."""
    (tmp_path / shard_name(0)).write_bytes(dataloader.split_shards("train")[0].read_bytes())
    pq.write_table(pa.table({"text": ["validation"]}), tmp_path / shard_name(1))
    loader = DistributedTokenLoader(tiny_tokenizer, 8, 512, "train", data_dir=tmp_path, packing="best_fit",
                                    tokenizer_threads=2)
    packer, taken_in = loader._packer, []
    take = packer._take_row_group
    packer._take_row_group = lambda: taken_in.append(take()) or taken_in[-1]
    for _ in range(40):
        next(loader)
    tokens_taken_in = sum(len(doc) for _, docs in taken_in for doc in docs)
    buffered = sum(len(tokens) + dropped for tokens, _, _, dropped in packer._docs.values())
    assert packer.tokens_packed + packer.tokens_discarded + buffered == tokens_taken_in
    assert 0 < loader.discarded_fraction < 1
    print(f"best_fit at T=512 discards {loader.discarded_fraction:.1%} of the tokens of shard_00000 (vocab 512)")
    loader.close()


def test_two_loaders_over_the_same_shards_yield_the_same_batches(tiny_tokenizer, varied_shards):
    data_dir, _ = varied_shards
    first, second = best_fit_loader(tiny_tokenizer, data_dir), best_fit_loader(tiny_tokenizer, data_dir)
    for _ in range(10):
        for a, b in zip(next(first), next(second)):
            assert torch.equal(a, b)


def test_resume_from_any_batch_yields_exactly_the_uninterrupted_batches(tiny_tokenizer, varied_shards):
    data_dir, _ = varied_shards
    loader = best_fit_loader(tiny_tokenizer, data_dir)
    states, batches = [], []
    for _ in range(30):  # > one epoch of the 8 train row groups
        states.append(json.loads(json.dumps(loader.state_dict())))  # what a checkpoint's JSON meta holds
        batches.append(next(loader))
    assert states[-1]["read_through"]["epoch"] >= 1
    assert max(len(state["buffered"]) for state in states) > 1  # the buffer spans row groups
    for k in (0, 1, 4, 13, 26):
        resumed = best_fit_loader(tiny_tokenizer, data_dir, resume_state=states[k])
        assert resumed.state_dict() == states[k]
        for expected_inputs, expected_targets in batches[k:k + 4]:
            inputs, targets = next(resumed)
            assert torch.equal(inputs, expected_inputs) and torch.equal(targets, expected_targets)
        resumed.close()


def test_a_state_from_another_packing_or_row_length_is_refused_with_the_fix(tiny_tokenizer, varied_shards):
    data_dir, _ = varied_shards
    best_fit = best_fit_loader(tiny_tokenizer, data_dir)
    next(best_fit)
    stream = DistributedTokenLoader(tiny_tokenizer, 2, 64, "train", data_dir=data_dir)
    next(stream)
    with pytest.raises(ValueError, match="--packing stream"):
        best_fit_loader(tiny_tokenizer, data_dir, resume_state=stream.state_dict())
    with pytest.raises(ValueError, match="--packing best_fit"):
        DistributedTokenLoader(tiny_tokenizer, 2, 64, "train", data_dir=data_dir, resume_state=best_fit.state_dict())
    with pytest.raises(ValueError, match="--max-seq-len 64"):
        DistributedTokenLoader(tiny_tokenizer, 2, 32, "train", data_dir=data_dir, packing="best_fit",
                               resume_state=best_fit.state_dict())
    with pytest.raises(ValueError, match="malformed"):
        best_fit_loader(tiny_tokenizer, data_dir, resume_state={**best_fit.state_dict(), "buffered": [{}]})
    with pytest.raises(ValueError, match="packing must be one of stream, best_fit"):
        DistributedTokenLoader(tiny_tokenizer, 2, 64, "train", data_dir=data_dir, packing="tight")


def test_stream_packing_is_the_default(tiny_tokenizer, varied_shards):
    data_dir, _ = varied_shards
    default = DistributedTokenLoader(tiny_tokenizer, 2, 64, "train", data_dir=data_dir)
    stream = DistributedTokenLoader(tiny_tokenizer, 2, 64, "train", data_dir=data_dir, packing="stream")
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(next(default), next(stream)))
    assert "packing" not in default.state_dict() and default.discarded_fraction == 0.0



def test_base_train_flags_choose_the_packing_and_corpus(capsys):
    from scripts.base_train import RUN_DEFINING_FLAGS, parse_args

    args = parse_args(["--packing", "best_fit", "--corpus", "climbmix"])
    assert (args.packing, args.corpus) == ("best_fit", "climbmix")
    assert RUN_DEFINING_FLAGS["packing"] == "stream" and RUN_DEFINING_FLAGS["corpus"] == "fineweb"
    with pytest.raises(SystemExit):
        parse_args(["--corpus", "climbmix", "--data", "some/dir"])
    assert "give --data or --corpus, not both" in capsys.readouterr().err
