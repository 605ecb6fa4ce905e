"""
CORE: the base-model metric of the DCLM paper (https://arxiv.org/abs/2406.11794).

22 in-context-learning tasks from the eval bundle (core.yaml lists them, eval_meta_data.csv holds each task's
random-guessing baseline in percent, eval_data/**.jsonl the items). Three ways to score an item, all by
teacher-forced forward passes, no sampling:
- multiple_choice:   one context, several continuations (the choices): pick the lowest mean loss over the
                     continuation tokens.
- schema:            several contexts, one common continuation: pick the context under which the continuation
                     has the lowest mean loss.
- language_modeling: the greedy (argmax) prediction at every continuation position must equal the continuation.
Few-shot examples come first, drawn deterministically per item (never the item itself).
A task's accuracy is centered against its random baseline, (acc - b) / (1 - b), and CORE is the mean of the
centered accuracies. This module renders, tokenizes and scores the items and computes CORE; finding the
bundle and reading its tasks is nanochat/eval_bundle.py.

Speed (bench/eval.py): sequences of many items are padded into one forward pass (sorted by length, so little
padding), and a multiple-choice item's shared few-shot context goes through the model once, into a KV cache its
choices continue from, instead of once per choice. On a 2-core CPU (depth-4 model, 16 items per task) this runs
2.4x the examples/second of one item per forward: 3.3-4.1x on the 4-choice few-shot tasks, ~1.7x on 2-choice
ones, ~1x on language modeling, where a CPU has no per-pass overhead for batching to amortise.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from nanochat.common import all_reduce_sum, get_dist_info
from nanochat.eval_bundle import TaskSpec, load_core_tasks, load_task_data
from nanochat.gpt import GPTConfig

FEWSHOT_SEED = 1234  # item i draws its few-shot examples with random.Random(FEWSHOT_SEED + i)
DATA_SHUFFLE_SEED = 1337  # --max-per-task takes a fixed random subset, not the (often sorted) file head


# -----------------------------------------------------------------------------
# Prompts


def sample_fewshot(data: Sequence[dict], index: int, num_fewshot: int) -> list[dict]:
    """`num_fewshot` other items of the task, the same every run for item `index`."""
    if num_fewshot <= 0:
        return []
    others = [i for i in range(len(data)) if i != index]
    chosen = random.Random(FEWSHOT_SEED + index).sample(others, min(num_fewshot, len(others)))
    return [data[i] for i in chosen]


def render_prompts_mc(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """One full prompt per choice; they share the context and differ in the continuation."""
    prefix = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
    return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """One full prompt per context option; they share the continuation."""
    prefix = "".join(f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    return [f"{prefix}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]


def render_prompts_lm(item: dict, delimiter: str, fewshot: Sequence[dict] = ()) -> list[str]:
    """[prompt without the continuation, prompt with it]. Contexts are stripped (some carry trailing
    whitespace) and so is the first prompt: a trailing space would be absorbed into the continuation's first
    token in the second prompt, and the first would no longer be a clean token prefix of it."""
    prefix = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{prefix}{item['context'].strip()}{delimiter}"
    return [without.strip(), f"{without}{item['continuation']}"]


RENDERERS = {"multiple_choice": render_prompts_mc, "schema": render_prompts_schema,
             "language_modeling": render_prompts_lm}


def render_item(data: Sequence[dict], index: int, spec: TaskSpec) -> list[str]:
    fewshot = sample_fewshot(data, index, spec.num_fewshot)
    return RENDERERS[spec.task_type](data[index], spec.continuation_delimiter, fewshot)


# -----------------------------------------------------------------------------
# Tokens: each item becomes sequences with a scored span [start, end) of continuation tokens


@dataclass
class ScoredSequences:
    tokens: list[list[int]]
    starts: list[int]
    ends: list[int]


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    length = 0
    for column in zip(*sequences):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length


def _common_suffix_length(sequences: Sequence[Sequence[int]]) -> int:
    return _common_prefix_length([seq[::-1] for seq in sequences])


def spans_for(task_type: str, tokens: list[list[int]]) -> ScoredSequences:
    """Where the continuation lies in each tokenized prompt. Found in token space, not text space: the
    tokenizer may merge the delimiter's space into the continuation's first token."""
    if task_type == "multiple_choice":
        common = _common_prefix_length(tokens)
        starts = [min(common, len(seq) - 1) for seq in tokens]  # a choice may be a prefix of another
        return ScoredSequences(tokens, starts, [len(seq) for seq in tokens])
    if task_type == "schema":
        suffix = min(_common_suffix_length(tokens), min(len(seq) for seq in tokens) - 1)
        return ScoredSequences(tokens, [len(seq) - suffix for seq in tokens], [len(seq) for seq in tokens])
    without, with_continuation = tokens
    start = min(_common_prefix_length([without, with_continuation]), len(with_continuation) - 1)
    return ScoredSequences([with_continuation], [start], [len(with_continuation)])


def crop_to_length(scored: ScoredSequences, max_len: int | None) -> ScoredSequences:
    """Fit an item into the model's context by dropping its oldest tokens (the continuations are at the end).
    All of an item's sequences lose the same number of tokens, so their common context stays common; at least
    one token of context stays so the first continuation token is predicted from something."""
    longest = max(len(seq) for seq in scored.tokens)
    if max_len is None or longest <= max_len:
        return scored
    crop = longest - max_len
    if min(len(seq) for seq in scored.tokens) - crop < 2:  # a choice longer than the context: crop each alone
        crops = [max(0, len(seq) - max_len) for seq in scored.tokens]
    else:
        crops = [crop] * len(scored.tokens)
    return ScoredSequences(
        tokens=[seq[c:] for seq, c in zip(scored.tokens, crops)],
        starts=[max(1, start - c) for start, c in zip(scored.starts, crops)],
        ends=[end - c for end, c in zip(scored.ends, crops)],
    )


def prepare_items(tokenizer, data: Sequence[dict], indices: Sequence[int], spec: TaskSpec,
                  max_len: int | None) -> list[ScoredSequences]:
    prompts = [render_item(data, i, spec) for i in indices]
    flat = [p for item_prompts in prompts for p in item_prompts]
    flat_tokens = tokenizer.encode(flat, prepend=tokenizer.get_bos_token_id()) if flat else []
    items, offset = [], 0
    for item_prompts in prompts:
        tokens = flat_tokens[offset:offset + len(item_prompts)]
        offset += len(item_prompts)
        items.append(crop_to_length(spans_for(spec.task_type, tokens), max_len))
    return items


# -----------------------------------------------------------------------------
# Forward passes


# Padded tokens per forward pass. A GPU wants big passes; a CPU has no launch overhead to amortise and slows down
# once the activations leave its caches: a depth-4 model on 2 cores costs ~60-80 us/token at 500-2000 tokens per
# pass and ~105 us/token at 9600 (bench/eval.py's model, measured with forward_losses).
MAX_BATCH_TOKENS = {"cpu": 2048}
DEFAULT_MAX_BATCH_TOKENS = 8192  # logits of 8192 tokens x 65536 vocab in fp32 are 2 GiB
MIN_SHARED_PREFIX = 32  # shorter shared prefixes (zero-shot questions) save less than a second forward pass costs


@torch.no_grad()
def forward_losses(model, input_ids: torch.Tensor, kv_cache=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids -> per-position loss of predicting the next token, and the argmax prediction. The last column
    has no next token: its loss is nan."""
    logits = model(input_ids) if kv_cache is None else model(input_ids, kv_cache=kv_cache)
    batch, length, vocab = logits.shape
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.reshape(-1, vocab).float(), targets.reshape(-1), reduction="none")
    losses = losses.view(batch, length)
    losses[:, -1] = float("nan")
    return losses, logits.argmax(dim=-1)


def shared_prefix_length(item: ScoredSequences) -> int:
    """Tokens that all of an item's sequences start with and that lie before every scored position: they can be
    run through the model once for the whole item (the position before a span predicts its first token, so that
    one must be computed per sequence)."""
    if len(item.tokens) < 2:
        return 0
    return max(0, min(_common_prefix_length(item.tokens), min(item.starts) - 1))


def pack(widths: Sequence[int], rows: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Group units (sequences, or items of several sequences) into forward passes: longest first, so that the
    padded width of a pass is the width of its first unit, while it stays within `batch_size` rows and
    `max_batch_tokens` padded tokens."""
    order = sorted(range(len(widths)), key=lambda i: -widths[i])
    batches, current, current_rows = [], [], 0
    for unit in order:
        width = widths[current[0]] if current else widths[unit]
        fits = current_rows + rows[unit] <= batch_size and (current_rows + rows[unit]) * width <= max_batch_tokens
        if current and not fits:
            batches.append(current)
            current, current_rows = [], 0
        current.append(unit)
        current_rows += rows[unit]
    if current:
        batches.append(current)
    return batches


def _pad(sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    # right padding: in a causal model the real positions never attend to the pad tokens after them
    ids = torch.full((len(sequences), max(len(seq) for seq in sequences)), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
    return ids


def _record(losses: torch.Tensor, predictions: torch.Tensor, input_ids: torch.Tensor,
            spans: Sequence[tuple[int, int]]) -> list[tuple[float, bool]]:
    """Per row: mean loss over the span [start, end) and whether argmax decoding reproduces it. Position t
    predicts token t+1, so the span is read at positions [start-1, end-1)."""
    losses, predictions, input_ids = losses.cpu(), predictions.cpu(), input_ids.cpu()
    out = []
    for row, (start, end) in enumerate(spans):
        mean_loss = losses[row, start - 1:end - 1].mean().item()
        exact = bool(torch.equal(predictions[row, start - 1:end - 1], input_ids[row, start:end]))
        out.append((mean_loss, exact))
    return out


def _is_nanochat_gpt(model) -> bool:
    """Our GPT gets the fast paths (KV-cache prefix sharing, span-only LM head); any other model that maps ids to
    logits is scored from its full logits."""
    return isinstance(getattr(model, "config", None), GPTConfig) and hasattr(model, "lm_head")


@torch.no_grad()
def _score_spans(model, input_ids: torch.Tensor, spans: Sequence[tuple[int, int]],
                 kv_cache=None) -> list[tuple[float, bool]]:
    """What _record computes from full logits, with the LM head applied only where a span is predicted: a row
    of a few hundred tokens scores a handful, and at a large vocabulary the head is most of a small model's
    work (and its (B, T, vocab) logits most of the memory)."""
    hidden = model.hidden_states(input_ids, kv_cache=kv_cache)
    rows = torch.cat([torch.full((end - start,), row) for row, (start, end) in enumerate(spans)])
    positions = torch.cat([torch.arange(start - 1, end - 1) for start, end in spans])  # t predicts token t+1
    rows, positions = rows.to(input_ids.device), positions.to(input_ids.device)
    logits = model.logits(hidden[rows, positions])
    targets = input_ids[rows, positions + 1]
    losses = F.cross_entropy(logits, targets, reduction="none").cpu()
    hits = (logits.argmax(dim=-1) == targets).cpu()
    out, offset = [], 0
    for start, end in spans:
        n = end - start
        out.append((losses[offset:offset + n].mean().item(), bool(hits[offset:offset + n].all())))
        offset += n
    return out


@torch.no_grad()
def _score_plain(model, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], device,
                 pad_id: int, per_example: bool = False) -> list[tuple[float, bool]]:
    """Score padded sequences in one forward pass. per_example: the reference path, with full logits."""
    input_ids = _pad(sequences, pad_id).to(device)
    if not per_example and _is_nanochat_gpt(model):
        return _score_spans(model, input_ids, spans)
    losses, predictions = forward_losses(model, input_ids)
    return _record(losses, predictions, input_ids, spans)


@torch.no_grad()
def _score_shared(model, items: Sequence[ScoredSequences], device, pad_id: int) -> list[list[tuple[float, bool]]]:
    """Items whose sequences share a long prefix (few-shot multiple choice: everything but the choice): the
    prefixes go through the model once per item, into a KV cache that every sequence's row then copies, and only
    the distinct tails are run per sequence."""
    prefix_lengths = [shared_prefix_length(item) for item in items]
    prefill = model.new_kv_cache(len(items), max(prefix_lengths))
    model.hidden_states(_pad([item.tokens[0][:p] for item, p in zip(items, prefix_lengths)], pad_id).to(device),
                        kv_cache=prefill)  # only the cache is wanted
    prefill.pos.copy_(torch.tensor(prefix_lengths))  # forget the padding: rows continue after their own prefix
    owners = [(g, s) for g, item in enumerate(items) for s in range(len(item.tokens))]
    tails, spans = [], []
    for g, s in owners:
        item, p = items[g], prefix_lengths[g]
        tails.append(item.tokens[s][p:])
        spans.append((item.starts[s] - p, item.ends[s] - p))
    # the model attends over max(pos) + T positions for every row, hence not max(prefix + tail)
    cache = model.new_kv_cache(len(owners), max(prefix_lengths) + max(len(tail) for tail in tails))
    for row, (g, _) in enumerate(owners):
        cache.copy_row(prefill, g, row)
    scores = _score_spans(model, _pad(tails, pad_id).to(device), spans, kv_cache=cache)
    grouped: list[list[tuple[float, bool]]] = [[] for _ in items]
    for (g, _), score in zip(owners, scores):
        grouped[g].append(score)
    return grouped


def score_items(model, items: Sequence[ScoredSequences], device: torch.device | str, pad_id: int,
                batch_size: int = 32, max_batch_tokens: int | None = None,
                per_example: bool = False) -> list[list[tuple[float, bool]]]:
    """(mean loss over the span, greedy decoding reproduces the span) for every sequence of every item.
    per_example=True is the unbatched reference: one forward pass per item, holding all its sequences."""
    results: list[list[tuple[float, bool]]] = [[] for _ in items]
    if max_batch_tokens is None:
        max_batch_tokens = MAX_BATCH_TOKENS.get(torch.device(device).type, DEFAULT_MAX_BATCH_TOKENS)
    if per_example:
        for i, item in enumerate(items):
            results[i] = _score_plain(model, item.tokens, list(zip(item.starts, item.ends)), device, pad_id,
                                      per_example=True)
        return results
    use_cache = _is_nanochat_gpt(model)
    shared = [i for i, item in enumerate(items) if use_cache and shared_prefix_length(item) >= MIN_SHARED_PREFIX]
    shared_set = set(shared)
    # items with a long shared prefix: packed item by item, each pass = prefill + tails
    widths = [max(len(seq) for seq in items[i].tokens) for i in shared]
    for batch in pack(widths, [len(items[i].tokens) for i in shared], batch_size, max_batch_tokens):
        for i, scores in zip(batch, _score_shared(model, [items[shared[b]] for b in batch], device, pad_id)):
            results[shared[i]] = scores
    # everything else: sequences packed individually
    units = [(i, s) for i, item in enumerate(items) if i not in shared_set for s in range(len(item.tokens))]
    for i, _ in units:
        results[i] = [None] * len(items[i].tokens)
    widths = [len(items[i].tokens[s]) for i, s in units]
    for batch in pack(widths, [1] * len(units), batch_size, max_batch_tokens):
        chosen = [units[b] for b in batch]
        scores = _score_plain(model, [items[i].tokens[s] for i, s in chosen],
                              [(items[i].starts[s], items[i].ends[s]) for i, s in chosen], device, pad_id)
        for (i, s), score in zip(chosen, scores):
            results[i][s] = score
    return results


def _max_len(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "sequence_len", None)


def evaluate_task(model, tokenizer, data: Sequence[dict], spec: TaskSpec, device: torch.device | str,
                  batch_size: int = 32, max_batch_tokens: int | None = None, per_example: bool = False) -> float:
    """Accuracy on one task. Under torchrun each rank takes items rank, rank + world, ... and the per-item
    results are summed across ranks."""
    ranks = get_dist_info()
    rank, world_size = ranks.rank, ranks.world_size
    indices = list(range(rank, len(data), world_size))
    items = prepare_items(tokenizer, data, indices, spec, _max_len(model))
    scores = score_items(model, items, device, tokenizer.get_bos_token_id(), batch_size, max_batch_tokens,
                         per_example)
    correct_list = [0.0] * len(data)
    for index, item_scores in zip(indices, scores):
        if spec.task_type == "language_modeling":
            correct_list[index] = float(item_scores[0][1])
        else:
            losses = [mean_loss for mean_loss, _ in item_scores]
            correct_list[index] = float(losses.index(min(losses)) == data[index]["gold"])
    correct = all_reduce_sum(torch.tensor(correct_list, dtype=torch.float32, device=device))
    return correct.mean().item() if len(data) else float("nan")


# -----------------------------------------------------------------------------
# CORE


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so that random guessing scores 0 and perfection 1 (baseline as a fraction)."""
    return (accuracy - random_baseline) / (1.0 - random_baseline)


@dataclass
class CoreResult:
    accuracy: dict[str, float] = field(default_factory=dict)
    centered: dict[str, float] = field(default_factory=dict)
    num_items: dict[str, int] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # label -> reason
    tasks: list[TaskSpec] = field(default_factory=list)

    @property
    def core(self) -> float:
        """Mean centered accuracy over the tasks that were evaluated."""
        values = list(self.centered.values())
        return sum(values) / len(values) if values else float("nan")


def evaluate_core(model, tokenizer, device: torch.device | str, bundle_dir: Path, max_per_task: int = -1,
                  batch_size: int = 32, log: Callable[[str], None] = print) -> CoreResult:
    """CORE over every task of the bundle that is present; the missing ones are named in the result."""
    specs, missing = load_core_tasks(bundle_dir)
    result = CoreResult(missing=missing, tasks=specs)
    started = time.time()
    for done, spec in enumerate(specs, start=1):
        task_started = time.time()
        data = load_task_data(bundle_dir, spec)
        random.Random(DATA_SHUFFLE_SEED).shuffle(data)
        if max_per_task > 0:
            data = data[:max_per_task]
        accuracy = evaluate_task(model, tokenizer, data, spec, device, batch_size=batch_size)
        result.accuracy[spec.label] = accuracy
        result.centered[spec.label] = centered_accuracy(accuracy, spec.random_baseline)
        result.num_items[spec.label] = len(data)
        elapsed = time.time() - started
        eta = elapsed / done * (len(specs) - done)
        log(f"[{done:2d}/{len(specs)}] {spec.label:<34} {len(data):5d} items  accuracy {accuracy:.4f}  centered "
            f"{result.centered[spec.label]:+.4f}  ({time.time() - task_started:.1f}s, ETA {eta:.0f}s)")
    return result
