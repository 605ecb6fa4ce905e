"""CORE: prompt rendering, answer selection for each task type, batching, the bundle (mirror, download, bad files),
centered accuracy and a full run over the mirror's 18 tasks."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from nanochat import core_eval
from nanochat.core_eval import (
    MIN_SHARED_PREFIX,
    ScoredSequences,
    centered_accuracy,
    crop_to_length,
    evaluate_core,
    evaluate_task,
    pack,
    prepare_items,
    render_prompts_lm,
    render_prompts_mc,
    render_prompts_schema,
    sample_fewshot,
    score_items,
    shared_prefix_length,
)
from nanochat.eval_bundle import CORE_TASKS, download_eval_bundle, get_eval_bundle, load_core_tasks, load_task_data
from nanochat.gpt import GPT, GPTConfig
from tasks.common import MalformedDataError

MIRROR_BUNDLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval_bundle"
MISSING_FROM_MIRROR = {"hellaswag_zeroshot", "hellaswag", "squad", "coqa"}


def spec_of(label: str, **changes) -> core_eval.TaskSpec:
    specs, _ = load_core_tasks(MIRROR_BUNDLE)
    return dataclasses.replace(next(s for s in specs if s.label == label), **changes)


def items_of(label: str) -> list[dict]:
    return load_task_data(MIRROR_BUNDLE, spec_of(label))


# -----------------------------------------------------------------------------
# The bundle's configuration


def test_the_mirror_holds_18_of_the_22_core_tasks_with_their_baselines():
    specs, missing = load_core_tasks(MIRROR_BUNDLE)
    assert len(CORE_TASKS) == 22
    assert len(specs) == 18 and set(missing) == MISSING_FROM_MIRROR
    assert all("not listed" in reason for reason in missing.values())
    by_label = {s.label: s for s in specs}
    # the CSV gives percentages
    assert by_label["arc_easy"].random_baseline == 0.25
    assert by_label["commonsense_qa"].random_baseline == pytest.approx(0.403)
    assert by_label["boolq"].random_baseline == 0.62
    assert by_label["jeopardy"].random_baseline == 0.0
    assert by_label["arc_easy"].num_fewshot == 10 and by_label["arc_easy"].continuation_delimiter == "\nAnswer: "
    assert by_label["copa"].num_fewshot == 0 and by_label["copa"].continuation_delimiter == " "  # the default
    assert by_label["winograd"].task_type == "schema" and by_label["lambada_openai"].task_type == "language_modeling"


def test_centered_accuracy_maps_chance_to_zero_and_perfect_to_one():
    assert centered_accuracy(0.25, 0.25) == 0.0
    assert centered_accuracy(1.0, 0.25) == 1.0
    assert centered_accuracy(0.625, 0.25) == pytest.approx(0.5)
    assert centered_accuracy(0.4, 0.5) == pytest.approx(-0.2)
    assert centered_accuracy(0.3, 0.0) == pytest.approx(0.3)
    result = core_eval.CoreResult(centered={"a": 0.5, "b": -0.1, "c": 0.2})
    assert result.core == pytest.approx(0.2)


# -----------------------------------------------------------------------------
# Prompts, checked against the bundle's own items


def test_multiple_choice_prompts_share_the_context_and_end_in_each_choice():
    copa = items_of("copa")[0]
    assert render_prompts_mc(copa, " ") == [
        "The man turned on the faucet, therefore the toilet filled with water.",
        "The man turned on the faucet, therefore water flowed from the spout.",
    ]


def test_few_shot_examples_come_first_with_their_gold_answers():
    arc = items_of("arc_easy")
    prompts = render_prompts_mc(arc[2], "\nAnswer: ", fewshot=[arc[0], arc[1]])
    assert prompts[3] == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\n"
        "Answer: Sunlight is the source of energy for nearly all ecosystems.\n\n"
        "Question: Which piece of safety equipment is used to keep mold spores from entering the respiratory "
        "system?\nAnswer: breathing mask\n\n"
        "Question: Meiosis is a type of cell division in which germ cells divide to produce haploid cells. "
        "Where does meiosis occur?\nAnswer: ovary cells"
    )


def test_schema_prompts_vary_the_context_and_share_the_continuation():
    winograd = items_of("winograd")[0]
    assert render_prompts_schema(winograd, " ") == [
        "The city councilmen refused the demonstrators a permit because the city councilmen feared violence.",
        "The city councilmen refused the demonstrators a permit because the demonstrators feared violence.",
    ]
    shot = {"context_options": ["A", "B"], "continuation": "c.", "gold": 1}
    assert render_prompts_schema(winograd, " ", [shot])[0].startswith("B c.\n\nThe city councilmen")


def test_language_modeling_prompts_are_without_and_with_the_continuation():
    jeopardy = items_of("jeopardy")[0]
    without, with_continuation = render_prompts_lm(jeopardy, "\nAnswer: ")
    context = ("WORLD HISTORY: This Navy commander flew from a base at Little America to the South Pole & back "
               "Nov. 28-29, 1929")
    assert without == f"{context}\nAnswer:"  # stripped, so it is a clean token prefix of the other
    assert with_continuation == f"{context}\nAnswer: Admiral Richard Byrd"
    shot = {"context": "  Q1 \n", "continuation": "A1"}
    assert render_prompts_lm(jeopardy, " ", [shot])[1].startswith("Q1 A1\n\nWORLD HISTORY")


def test_few_shot_sampling_is_deterministic_and_never_picks_the_item_itself():
    data = [{"i": i} for i in range(30)]
    for index in range(30):
        shots = sample_fewshot(data, index, 10)
        assert len(shots) == 10 and data[index] not in shots
        assert len({s["i"] for s in shots}) == 10
        assert shots == sample_fewshot(data, index, 10)
    assert sample_fewshot(data, 0, 10) != sample_fewshot(data, 1, 10)
    assert sorted(s["i"] for s in sample_fewshot(data[:4], 0, 10)) == [1, 2, 3]  # fewer items than shots: all
    assert sample_fewshot(data, 3, 0) == []


def test_scored_spans_cover_exactly_the_continuation_tokens(tiny_tokenizer):
    copa = prepare_items(tiny_tokenizer, items_of("copa"), [0], spec_of("copa"), None)[0]
    assert [tiny_tokenizer.decode(seq[s:e]) for seq, s, e in zip(copa.tokens, copa.starts, copa.ends)] == [
        " the toilet filled with water.", " water flowed from the spout."]
    winograd = prepare_items(tiny_tokenizer, items_of("winograd"), [0], spec_of("winograd"), None)[0]
    assert {tiny_tokenizer.decode(seq[s:e]) for seq, s, e in zip(winograd.tokens, winograd.starts, winograd.ends)} \
        == {" feared violence."}
    jeopardy = prepare_items(tiny_tokenizer, items_of("jeopardy"), [0], spec_of("jeopardy", num_fewshot=0), None)[0]
    assert len(jeopardy.tokens) == 1
    seq, start, end = jeopardy.tokens[0], jeopardy.starts[0], jeopardy.ends[0]
    assert tiny_tokenizer.decode(seq[start:end]) == " Admiral Richard Byrd"
    assert seq[0] == tiny_tokenizer.get_bos_token_id()


def test_cropping_keeps_the_end_and_shifts_the_spans_of_all_sequences_alike():
    item = ScoredSequences(tokens=[list(range(10)), list(range(8))], starts=[7, 6], ends=[10, 8])
    cropped = crop_to_length(item, 6)
    assert cropped.tokens == [[4, 5, 6, 7, 8, 9], [4, 5, 6, 7]]
    assert cropped.starts == [3, 2] and cropped.ends == [6, 4]
    assert crop_to_length(item, 10) is item


# -----------------------------------------------------------------------------
# Choosing the answer: a fake model whose predictions we control


class OracleModel(nn.Module):
    """Predicts, with high confidence, the next token of whichever oracle sequence the row so far follows; where
    the row has left every oracle it predicts nothing (uniform logits). Causal, so padding cannot leak."""

    def __init__(self, oracles: list[list[int]], vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.next_token = {tuple(seq[:t + 1]): seq[t + 1] for seq in oracles for t in range(len(seq) - 1)}

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                token = self.next_token.get(tuple(row[:t + 1]))
                if token is not None:
                    logits[b, t, token] = 20.0
        return logits


def oracle_for(tokenizer, prompts: list[str]) -> OracleModel:
    return OracleModel(tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id()), tokenizer.get_vocab_size())


@pytest.mark.parametrize("per_example", [True, False])
def test_multiple_choice_picks_the_choice_with_the_lowest_loss(tiny_tokenizer, per_example):
    spec, item = spec_of("copa"), items_of("copa")[0]  # gold is choice 1
    prompts = render_prompts_mc(item, " ")
    for favoured in (0, 1):
        model = oracle_for(tiny_tokenizer, [prompts[favoured]])
        accuracy = evaluate_task(model, tiny_tokenizer, [item], spec, "cpu", per_example=per_example)
        assert accuracy == float(favoured == item["gold"])


@pytest.mark.parametrize("per_example", [True, False])
def test_schema_picks_the_context_under_which_the_continuation_is_likeliest(tiny_tokenizer, per_example):
    spec, item = spec_of("winograd"), items_of("winograd")[0]  # gold is context 0
    prompts = render_prompts_schema(item, " ")
    for favoured in (0, 1):
        model = oracle_for(tiny_tokenizer, [prompts[favoured]])
        accuracy = evaluate_task(model, tiny_tokenizer, [item], spec, "cpu", per_example=per_example)
        assert accuracy == float(favoured == item["gold"])


@pytest.mark.parametrize("per_example", [True, False])
def test_language_modeling_needs_every_greedy_token_to_match(tiny_tokenizer, per_example):
    spec, item = spec_of("bigbench_qa_wikidata", num_fewshot=0), items_of("bigbench_qa_wikidata")[0]
    assert item["continuation"] == "French"
    right = evaluate_task(oracle_for(tiny_tokenizer, [item["context"] + " French"]), tiny_tokenizer, [item], spec,
                          "cpu", per_example=per_example)
    wrong = evaluate_task(oracle_for(tiny_tokenizer, [item["context"] + " German"]), tiny_tokenizer, [item],
                          spec, "cpu", per_example=per_example)
    partly = evaluate_task(oracle_for(tiny_tokenizer, [item["context"] + " Fr"]), tiny_tokenizer, [item], spec,
                           "cpu", per_example=per_example)
    assert (right, wrong, partly) == (1.0, 0.0, 0.0)


def test_batched_and_per_example_scoring_agree_across_many_items(tiny_tokenizer):
    spec, data = spec_of("copa"), items_of("copa")[:12]
    # the oracle knows the gold answer of the first 8 items and the wrong one of the last 4
    prompts = [render_prompts_mc(item, " ")[item["gold"] if i < 8 else 1 - item["gold"]] for i, item in enumerate(data)]
    model = oracle_for(tiny_tokenizer, prompts)
    batched = evaluate_task(model, tiny_tokenizer, data, spec, "cpu", batch_size=5)  # packs across items
    unbatched = evaluate_task(model, tiny_tokenizer, data, spec, "cpu", per_example=True)
    assert batched == unbatched == pytest.approx(8 / 12)


def test_pack_respects_the_row_and_token_budgets():
    widths, rows = [10, 50, 20, 40, 30], [1, 1, 1, 1, 1]
    batches = pack(widths, rows, batch_size=2, max_batch_tokens=1000)
    assert batches == [[1, 3], [4, 2], [0]]  # longest first
    assert pack(widths, rows, batch_size=10, max_batch_tokens=100) == [[1, 3], [4, 2, 0]]
    assert pack([5, 5], [3, 3], batch_size=4, max_batch_tokens=100) == [[0], [1]]  # an item's rows stay together


def test_sharing_the_few_shot_prefix_through_the_kv_cache_gives_the_same_scores(tiny_tokenizer):
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=2048, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                       n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights()
    nn.init.normal_(model.lm_head.weight, std=0.5)  # a less flat distribution than the init, so losses differ
    model.eval()
    spec = spec_of("arc_easy", num_fewshot=2)
    items = prepare_items(tiny_tokenizer, items_of("arc_easy")[:5], range(5), spec, config.sequence_len)
    assert all(shared_prefix_length(item) >= MIN_SHARED_PREFIX for item in items)
    pad = tiny_tokenizer.get_bos_token_id()
    reference = score_items(model, items, "cpu", pad, per_example=True)
    shared = score_items(model, items, "cpu", pad, batch_size=9)  # two items (eight sequences) per pass
    for ref_item, shared_item in zip(reference, shared):
        assert [loss for loss, _ in shared_item] == pytest.approx([loss for loss, _ in ref_item], abs=1e-4)
        assert [exact for _, exact in shared_item] == [exact for _, exact in ref_item]


# -----------------------------------------------------------------------------
# A whole CORE run on the mirror


def test_core_over_the_mirror_is_finite_and_names_the_missing_tasks(tiny_tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=512, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                          n_kv_head=2, n_embd=64))
    model.init_weights()
    model.eval()
    lines = []
    result = evaluate_core(model, tiny_tokenizer, "cpu", MIRROR_BUNDLE, max_per_task=2, log=lines.append)
    assert len(result.centered) == 18 and set(result.missing) == MISSING_FROM_MIRROR
    assert all(n == 2 for n in result.num_items.values())
    assert all(0.0 <= acc <= 1.0 for acc in result.accuracy.values())
    assert math.isfinite(result.core)
    assert result.core == pytest.approx(sum(result.centered.values()) / 18)
    assert len(lines) == 18 and "ETA" in lines[-1]


# -----------------------------------------------------------------------------
# Malformed bundles


@pytest.fixture
def small_bundle(tmp_path) -> Path:
    """A bundle with the mirror's config and one task, copa, whose file the test may corrupt."""
    bundle = tmp_path / "eval_bundle"
    (bundle / "eval_data" / "commonsense_reasoning").mkdir(parents=True)
    shutil.copy(MIRROR_BUNDLE / "eval_meta_data.csv", bundle)
    (bundle / "core.yaml").write_text(
        "icl_tasks:\n- label: copa\n  dataset_uri: commonsense_reasoning/copa.jsonl\n  num_fewshot: [0]\n"
        "  icl_task_type: multiple_choice\n")
    shutil.copy(MIRROR_BUNDLE / "eval_data" / "commonsense_reasoning" / "copa.jsonl",
                bundle / "eval_data" / "commonsense_reasoning")
    return bundle


def test_a_malformed_task_file_names_the_file_and_line(small_bundle):
    path = small_bundle / "eval_data" / "commonsense_reasoning" / "copa.jsonl"
    lines = path.read_text().splitlines()
    spec = load_core_tasks(small_bundle)[0][0]
    path.write_text("\n".join([lines[0], lines[1], '{"query": "broken', *lines[3:]]) + "\n")
    with pytest.raises(MalformedDataError, match=rf"{path}:3: not valid JSON"):
        load_task_data(small_bundle, spec)
    path.write_text("\n".join([lines[0], json.dumps({"query": "q", "choices": ["a", "b"]})]) + "\n")
    with pytest.raises(MalformedDataError, match=rf"{path}:2: missing key\(s\) \['gold'\]"):
        load_task_data(small_bundle, spec)
    path.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 2}) + "\n")
    with pytest.raises(MalformedDataError, match=rf"{path}: record 1: 'gold' must index into 'choices'"):
        load_task_data(small_bundle, spec)


def test_a_bundle_without_a_task_file_reports_it_missing(small_bundle):
    (small_bundle / "eval_data" / "commonsense_reasoning" / "copa.jsonl").unlink()
    specs, missing = load_core_tasks(small_bundle)
    assert specs == [] and len(missing) == 22
    assert "eval_data/commonsense_reasoning/copa.jsonl" in missing["copa"]


def test_an_unknown_task_type_is_a_clear_error(small_bundle):
    config = small_bundle / "core.yaml"
    config.write_text(config.read_text().replace("multiple_choice", "multiple_guess"))
    with pytest.raises(MalformedDataError, match="copa has icl_task_type 'multiple_guess'"):
        load_core_tasks(small_bundle)


# -----------------------------------------------------------------------------
# Downloading the bundle (from a local HTTP server)


def bundle_zip(bundle: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(bundle.rglob("*")):
            if path.is_file():
                archive.write(path, Path("eval_bundle") / path.relative_to(bundle))
    return buffer.getvalue()


def test_download_retries_a_server_error_then_unpacks_atomically(small_bundle, http_server, tmp_path):
    http_server["responses"] = [(500, b"try again"), (200, bundle_zip(small_bundle))]
    destination = tmp_path / "base" / "eval_bundle"
    assert download_eval_bundle(http_server["url"], destination, retries=3, backoff_seconds=0.01) == destination
    assert len(http_server["requests"]) == 2
    assert (destination / "core.yaml").read_text() == (small_bundle / "core.yaml").read_text()
    specs, missing = load_core_tasks(destination)
    assert [s.label for s in specs] == ["copa"] and len(missing) == 21
    assert [p.name for p in destination.parent.iterdir()] == ["eval_bundle"]  # no temp files left


def test_download_that_never_yields_a_zip_fails_clearly_and_leaves_nothing(http_server, tmp_path):
    http_server["responses"] = [(200, b"<html>not a zip</html>")]
    destination = tmp_path / "base" / "eval_bundle"
    with pytest.raises(RuntimeError, match="could not download the CORE eval bundle") as excinfo:
        download_eval_bundle(http_server["url"], destination, retries=3, backoff_seconds=0.01)
    assert "NANOCHAT_EVAL_BUNDLE_URL" in str(excinfo.value)
    assert len(http_server["requests"]) == 3
    assert list(destination.parent.iterdir()) == []


def test_download_does_not_retry_a_missing_file(http_server, tmp_path):
    http_server["responses"] = [(404, b"no such file")]
    with pytest.raises(RuntimeError, match="HTTP Error 404"):
        download_eval_bundle(http_server["url"], tmp_path / "eval_bundle", retries=5, backoff_seconds=0.01)
    assert len(http_server["requests"]) == 1


def test_get_eval_bundle_prefers_the_mirror_else_downloads_once(small_bundle, http_server, base_dir, monkeypatch):
    assert get_eval_bundle() == MIRROR_BUNDLE  # conftest points NANOCHAT_DATA_DIR at the mirror
    monkeypatch.delenv("NANOCHAT_DATA_DIR")
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", http_server["url"])
    http_server["responses"] = [(200, bundle_zip(small_bundle))]
    assert get_eval_bundle() == base_dir / "eval_bundle"
    assert get_eval_bundle() == base_dir / "eval_bundle"
    assert len(http_server["requests"]) == 1  # the second call found it in place


# -----------------------------------------------------------------------------
# Several ranks


def _rank_worker(rank: int, world_size: int, init_file: str, out_dir: str, prompts: list[str],
                 tokenizer_dir: str) -> None:
    import torch.distributed as dist

    from nanochat.tokenizer import Tokenizer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    accuracy = evaluate_task(oracle_for(tokenizer, prompts), tokenizer, items_of("copa")[:10], spec_of("copa"), "cpu")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(accuracy))
    dist.destroy_process_group()


def test_ranks_split_the_items_and_agree_on_the_accuracy(tiny_tokenizer, tmp_path):
    data = items_of("copa")[:10]
    prompts = [render_prompts_mc(item, " ")[item["gold"] if i % 3 else 1 - item["gold"]] for i, item in enumerate(data)]
    single = evaluate_task(oracle_for(tiny_tokenizer, prompts), tiny_tokenizer, data, spec_of("copa"), "cpu")
    assert single == pytest.approx(0.6)
    tiny_tokenizer.save(tmp_path / "tokenizer")
    torch.multiprocessing.spawn(_rank_worker, args=(2, str(tmp_path / "init"), str(tmp_path), prompts,
                                                    str(tmp_path / "tokenizer")), nprocs=2)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)] == [single, single]


# -----------------------------------------------------------------------------
# scripts.base_eval end to end


def test_base_eval_scores_a_checkpoint_on_the_mirror_and_reports_core(tiny_tokenizer, base_dir):
    from dataclasses import asdict

    from nanochat.checkpoint import save_checkpoint
    from nanochat.gpt import model_config_from_depth
    from scripts import base_eval

    tiny_tokenizer.save(base_dir / "tokenizer")
    config = model_config_from_depth(2, tiny_tokenizer.get_vocab_size(), sequence_len=512)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    meta = {"model_config": asdict(config), "tokenizer_fingerprint": tiny_tokenizer.fingerprint(), "step": 5}
    save_checkpoint(base_dir / "base_checkpoints" / "d2", 5, model.state_dict(), None, meta)

    assert base_eval.main(["--device-type=cpu", "--max-per-task=2", "--sample-tokens=4", "--batch-size=8"]) == 0

    rows = (base_dir / "base_eval" / "base_d2_step000005.csv").read_text().splitlines()
    assert rows[0] == "task,task_type,num_fewshot,items,accuracy,random_baseline,centered,status"
    assert len(rows) == 1 + 22 + 1
    assert sum(row.endswith(",ok") for row in rows) == 18
    assert {row.split(",")[0] for row in rows if ",missing: " in row} == MISSING_FROM_MIRROR
    assert rows[-1].startswith("CORE,") and rows[-1].endswith("mean centered accuracy over 18/22 tasks")

    section = json.loads((base_dir / "report" / "base-model-evaluation.json").read_text())
    summary, centered, samples = section["data"]
    assert math.isfinite(summary["CORE metric"]) and summary["CORE tasks evaluated"] == "18/22"
    assert set(summary["Missing CORE tasks"].split(", ")) == MISSING_FROM_MIRROR
    assert len(centered) == 18 and summary["CORE metric"] == pytest.approx(sum(centered.values()) / 18)
    assert samples["Samples"][0].startswith("The capital of France is")
    assert len(samples["Samples"]) == len(base_eval.SAMPLE_PROMPTS)
