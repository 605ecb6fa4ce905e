"""The tokenizing loader: packed BOS-delimited documents, disjoint ranks, and a resume that is exact."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.dataloader import DistributedTokenLoader
from nanochat.dataset import shard_name


@pytest.fixture
def small_shards(tmp_path, mirror_texts):
    """Real documents in row groups of 3, so a few batches cross row-group, shard and epoch boundaries."""
    texts = [text[:300] for text in mirror_texts[:30]]
    for i, chunk in enumerate((texts[:12], texts[12:24], texts[24:])):
        pq.write_table(pa.table({"text": chunk}), tmp_path / shard_name(i), row_group_size=3)
    return tmp_path, texts


def test_batches_are_shifted_windows_of_bos_delimited_documents(tiny_tokenizer, small_shards):
    data_dir, texts = small_shards
    loader = DistributedTokenLoader(tiny_tokenizer, 2, 64, "train", data_dir=data_dir)
    inputs, targets = next(loader)
    assert inputs.shape == targets.shape == (2, 64) and inputs.dtype == torch.int64
    stream = torch.cat([inputs.reshape(-1), targets.reshape(-1)[-1:]])
    torch.testing.assert_close(targets.reshape(-1), stream[1:])
    bos = tiny_tokenizer.get_bos_token_id()
    expected = [t for text in texts[:3] for t in tiny_tokenizer.encode(text, prepend=bos)][:129]
    assert stream.tolist() == expected
    # the next batch starts where this one's targets ended: no token is skipped or repeated
    next_inputs, _ = next(loader)
    assert next_inputs[0, 0] == targets[-1, -1]


def test_resume_from_any_batch_yields_exactly_the_uninterrupted_batches(tiny_tokenizer, small_shards):
    data_dir, _ = small_shards
    loader = DistributedTokenLoader(tiny_tokenizer, 2, 48, "train", data_dir=data_dir, tokenizer_threads=2)
    states, batches = [], []
    for _ in range(40):  # > one epoch of the 8 train row groups
        states.append(loader.state_dict())
        batches.append(next(loader))
    assert states[-1]["epoch"] >= 1 and len({(s["shard"], s["row_group"]) for s in states}) > 4
    for k in (0, 1, 5, 17, 33):
        resumed = DistributedTokenLoader(tiny_tokenizer, 2, 48, "train", data_dir=data_dir, resume_state=states[k])
        assert resumed.state_dict() == states[k]
        for expected_inputs, expected_targets in batches[k:k + 6]:
            inputs, targets = next(resumed)
            assert torch.equal(inputs, expected_inputs) and torch.equal(targets, expected_targets)


def test_resume_state_does_not_depend_on_the_batch_shape(tiny_tokenizer, small_shards):
    data_dir, _ = small_shards
    loader = DistributedTokenLoader(tiny_tokenizer, 2, 48, "train", data_dir=data_dir)
    for _ in range(5):
        next(loader)
    state = loader.state_dict()
    stream = torch.cat([next(loader)[0].reshape(-1) for _ in range(4)])  # the next 4 * 96 tokens
    other = DistributedTokenLoader(tiny_tokenizer, 3, 32, "train", data_dir=data_dir, resume_state=state)
    assert torch.equal(next(other)[0].reshape(-1), stream[:96])


def test_ranks_read_different_documents_and_keep_their_own_state(tiny_tokenizer, small_shards):
    data_dir, _ = small_shards
    rank_loaders = [DistributedTokenLoader(tiny_tokenizer, 2, 48, "train", data_dir=data_dir, rank=r, world_size=2)
                    for r in range(2)]
    first = [next(loader)[0] for loader in rank_loaders]
    assert not torch.equal(first[0], first[1])
    state = rank_loaders[1].state_dict()
    assert (state["rank"], state["world_size"]) == (1, 2)
    with pytest.raises(ValueError, match="same number of processes"):
        DistributedTokenLoader(tiny_tokenizer, 2, 48, "train", data_dir=data_dir, resume_state=state)


def test_a_state_from_another_shard_set_is_rejected(tiny_tokenizer, small_shards):
    data_dir, _ = small_shards
    loader = DistributedTokenLoader(tiny_tokenizer, 2, 48, "train", data_dir=data_dir)
    next(loader)
    state = {**loader.state_dict(), "shard_name": "shard_00042.parquet"}
    with pytest.raises(ValueError, match="shard set the run started with"):
        DistributedTokenLoader(tiny_tokenizer, 2, 48, "train", data_dir=data_dir, resume_state=state)
    with pytest.raises(ValueError, match="malformed"):
        DistributedTokenLoader(tiny_tokenizer, 2, 48, "train", data_dir=data_dir, resume_state={"epoch": 0})


def test_validation_batches_come_from_the_last_shard(tiny_tokenizer, small_shards):
    data_dir, texts = small_shards
    inputs, _ = next(DistributedTokenLoader(tiny_tokenizer, 1, 16, "val", data_dir=data_dir))
    bos = tiny_tokenizer.get_bos_token_id()
    assert inputs[0].tolist() == tiny_tokenizer.encode(texts[24], prepend=bos)[:16]
