"""Inference: sample from a GPT with a KV cache, run its python tool calls, stream complete UTF-8 text.

Told in order: the tool-use state machine of one sample, the incremental text decoder, one sample as a stream of
events (text by message part, stop strings), the model's serving form (cast once, linear layers packed on CPU), and
the Engine that ties them together for one prompt and N samples. Tokens are picked by the shared sampler in
nanochat/sampling.py.
The continuous-batching scheduler that serves many prompts at once (nanochat/batching.py) reuses the sampler, the
tool state machine, the text decoder and the event stream, so a sample behaves the same in either place.
"""

from __future__ import annotations

import ast
import codecs
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from nanochat.common import get_compute_dtype
from nanochat.gpt import GPT
from nanochat.kernels import PackedLinear
from nanochat.quantize import quantize_model
from nanochat.sampling import draw_uniforms, sample_generators, sample_next_tokens, sampling_tensors
from nanochat.tokenizer import Tokenizer

# -----------------------------------------------------------------------------
# Tool use: the python tool, and the per-sample state machine that notices calls and forces the output

MAX_TOOL_OUTPUT_CHARS = 1000  # a chatty program must not fill the context window


def run_python_tool(code: str, timeout: float = 5.0, require_confinement: bool = True) -> str:
    """Run a tool call in the sandbox and return the text to force between <|output_start|> and <|output_end|>.
    A bare expression (the calculator calls "12/5" the chat data teaches) prints its value, like a REPL.
    require_confinement: refuse (the output says why) where the kernel's sandbox is unavailable; evaluation and
    RL pass False and run on the weaker layers with a warning (nanochat/execution.py)."""
    from nanochat.execution import SandboxUnavailable, execute_code  # needed only once a model calls the tool

    try:
        ast.parse(code, mode="eval")
        program = f"print(eval({code!r}))"
    except SyntaxError:
        program = code
    try:
        result = execute_code(program, timeout=timeout, require_confinement=require_confinement)
    except SandboxUnavailable as refusal:
        return f"Error: the python tool is disabled here: {refusal}"
    if result.success:
        output = result.stdout.rstrip("\n")
    else:
        stderr_lines = result.stderr.strip().splitlines()
        output = f"Error: {result.error or (stderr_lines[-1] if stderr_lines else 'the program failed')}"
    if len(output) > MAX_TOOL_OUTPUT_CHARS:
        output = output[:MAX_TOOL_OUTPUT_CHARS] + "...(truncated)"
    return output


class SpecialIds:
    """The special token ids the engine reacts to, looked up once."""

    def __init__(self, tokenizer: Tokenizer):
        special = tokenizer.encode_special
        self.bos = special("<|bos|>")
        self.assistant_end = special("<|assistant_end|>")
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.stops = (self.assistant_end, self.bos)
        # which part of an assistant message the text after each tool token belongs to
        self.part_after = {self.python_start: "python", self.python_end: "text",
                           self.output_start: "python_output", self.output_end: "text"}


class SampleState:
    """One sample's tool-use bookkeeping. Per step: `next_token(sampled)` picks the token to emit (a forced
    token if any is queued, else the sampled one) and reports whether it closed a python block; the caller
    runs the code and hands the result to `force_output`."""

    def __init__(self, special: SpecialIds):
        self.special = special
        self.forced: deque[int] = deque()
        self.code_tokens: list[int] | None = None  # not None while inside <|python_start|> ... <|python_end|>
        self.finished = False

    @property
    def samples_next(self) -> bool:
        """Whether the next token comes from the sampler (not forced, not finished)."""
        return not self.forced and not self.finished

    def next_token(self, sampled: int) -> tuple[int, int, list[int] | None]:
        """(token, mask, code): mask 0 for a forced token; code = the tokens of a python block just closed."""
        if self.forced:
            return self.forced.popleft(), 0, None
        special, token = self.special, sampled
        if token in special.stops:
            self.finished = True
        elif token == special.python_start:
            self.code_tokens = []
        elif token == special.python_end and self.code_tokens is not None:
            code, self.code_tokens = self.code_tokens, None
            return token, 1, code
        elif self.code_tokens is not None:
            self.code_tokens.append(token)
        return token, 1, None

    def force_output(self, output_tokens: list[int]) -> None:
        self.forced.extend([self.special.output_start, *output_tokens, self.special.output_end])


# -----------------------------------------------------------------------------
# Streaming text: tokens in, complete UTF-8 characters out


class TextStream:
    """Turns a token stream into text pieces that never split a character: a token may end in the middle of
    a multi-byte character, so its bytes wait in the incremental decoder until the character completes.
    Special tokens are not text; they yield nothing (the caller sees the token id)."""

    def __init__(self, tokenizer: Tokenizer):
        self._token_bytes = tokenizer.token_bytes
        self._special_ids = set(tokenizer.special_tokens.values())
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        if token in self._special_ids:
            return ""
        return self._decoder.decode(self._token_bytes(token))

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end) as replacement characters."""
        return self._decoder.decode(b"", final=True)


# -----------------------------------------------------------------------------
# One sample as a stream of events: tool use, text by message part, stop strings, the token limit


@dataclass
class Event:
    sample: int  # which of the prompt's n samples
    token: int | None  # the token this step produced (None on a final event that only carries leftovers)
    mask: int  # 0 = forced tool output
    text: str  # complete characters to append; never part of a stop string
    part: str  # what `text` belongs to: "text" | "python" (a tool call) | "python_output"
    finish_reason: str | None = None  # set on a sample's last event: "stop" | "length" | "cancelled" | "error"
    error: str | None = None


class SampleStream:
    """One sample's streaming state: its tool-use state machine, its text decoder, the part of the assistant message
    its text belongs to, and text held back because it may be the start of a stop string. The caller picks each
    token (`state.next_token`) and runs the tool calls; `emit` turns the token into the Event to stream out."""

    def __init__(self, index: int, special: SpecialIds, tokenizer: Tokenizer, stop: list[str], max_tokens: int):
        self.index = index
        self.special = special
        self.stop = stop
        self.max_tokens = max_tokens  # tokens generated (tool output included) before the sample ends at "length"
        self.state = SampleState(special)
        self.text = TextStream(tokenizer)
        self.part = "text"
        self.pending = ""  # text held back because it may be the start of a stop string
        self.generated = 0

    def emit(self, token: int, mask: int) -> Event:
        """The event for one generated token; finish_reason set when this token ends the sample."""
        self.generated += 1
        special = self.special
        text, part, finish = self.text.feed(token), self.part, None
        if token in special.stops and mask == 1:
            text, finish = self.flush(), "stop"
        elif token in special.part_after:
            text, self.pending = self.pending, ""  # a held-back prefix was plain text after all
            self.part = special.part_after[token]
        elif part == "text" and self.stop:
            text, finish = self._hold_back_stop_strings(text)
        if finish is None and self.generated >= self.max_tokens:
            text, finish = text + self.flush(), "length"
        return Event(self.index, token, mask, text, part, finish)

    def _hold_back_stop_strings(self, text: str) -> tuple[str, str | None]:
        buffer = self.pending + text
        hits = [buffer.find(stop) for stop in self.stop if stop in buffer]
        if hits:
            self.pending = ""
            return buffer[:min(hits)], "stop"
        # keep the longest tail that could still grow into a stop string
        hold = max((size for stop in self.stop for size in range(min(len(stop) - 1, len(buffer)), 0, -1)
                    if stop.startswith(buffer[-size:])), default=0)
        self.pending = buffer[len(buffer) - hold:] if hold else ""
        return buffer[:len(buffer) - hold], None

    def flush(self) -> str:
        """All the text still held back (the start of a would-be stop string, an incomplete character), for a
        sample that ends here."""
        text, self.pending = self.pending + self.text.flush(), ""
        return text

    def final_event(self, reason: str, error: str | None = None) -> Event:
        text = self.flush() if reason == "length" else ""
        return Event(self.index, None, 0, text, self.part, reason, error)


# -----------------------------------------------------------------------------
# The model as served: in the compute dtype, its linear layers packed on CPU


def prepare_for_serving(model: GPT, dtype: torch.dtype | None = None, quantization: str = "none") -> GPT:
    """The model, changed in place, as chat_cli and chat_web serve it: weights (and so KV caches) in `dtype`, by
    default the compute dtype of its device (bf16 on recent GPUs, fp32 on CPU unless NANOCHAT_DTYPE says otherwise);
    on CPU, linear layers packed for oneDNN (PackedLinear) where this CPU can pack that dtype. Training keeps fp32 weights (autocast casts them at every
    forward) for the optimizer's sake; a served model has no optimizer, so it is cast, and packed, once. The result
    is for inference only.
    bf16 halves the memory of weights and cache and the bytes each decode step reads; on CPU it is opt-in
    (NANOCHAT_DTYPE=bfloat16) because packed fp32 decodes about as fast: 2 Zen 5 cores with native bf16,
    bench/engine.py, bf16 vs fp32: 1.07x at batch 1, 0.97x at batch 16.
    quantization "int8" first rounds the linear layers to int8 groups (nanochat/quantize.py), from the fp32 weights
    (only the groups' scales are then cast to `dtype`); those layers are not packed."""
    dtype = dtype or get_compute_dtype(model.get_device().type)
    model = quantize_model(model, quantization).to(dtype).eval()
    if PackedLinear.available(model.get_device(), dtype):  # probed: bf16 packing needs AVX-512 or AVX-NE-CONVERT
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, nn.Linear):
                    setattr(module, name, PackedLinear(child))
    return model


# -----------------------------------------------------------------------------
# The Engine: one prompt, prefilled once, decoded as N independent samples


class Engine:
    def __init__(self, model: GPT, tokenizer: Tokenizer, require_confinement: bool = True):
        """require_confinement: run the model's python tool calls only in the kernel's sandbox (serving); False
        lets evaluation and RL fall back to the weaker layers where it is missing."""
        self.model = model
        self.tokenizer = tokenizer
        self.special = SpecialIds(tokenizer)
        self.require_confinement = require_confinement

    def run_tool(self, code_tokens: list[int]) -> str:
        """The output of one python tool call, as text to force into the sample."""
        return run_python_tool(self.tokenizer.decode(code_tokens), require_confinement=self.require_confinement)

    def max_context(self) -> int:
        """The most positions a KV cache can hold: the rotary table the model was built with."""
        return self.model.rotary_len

    @torch.inference_mode()
    def generate(self, tokens: list[int], num_samples: int = 1, max_tokens: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = 42) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token_column, mask_column), one token per sample per step; mask 0 marks forced tool output.

        A sample ends at <|assistant_end|> or <|bos|> (yielded); after that its column entry repeats that stop
        token until every sample has ended or `max_tokens` steps (default: the model's sequence_len) are done.
        """
        if not tokens:
            raise ValueError("generate needs at least one prompt token (start the prompt with <|bos|>)")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        max_tokens = self.model.config.sequence_len if max_tokens is None else max_tokens
        seq_len = min(len(tokens) + max_tokens, self.max_context())
        if len(tokens) >= seq_len:
            raise ValueError(f"the prompt has {len(tokens)} tokens; the model's context holds {self.max_context()}")
        device = self.model.get_device()

        # prefill the prompt once at batch 1, then replicate its cache into one row per sample
        prefill_cache = self.model.new_kv_cache(1, len(tokens))
        logits = self.model(torch.tensor([tokens], device=device), kv_cache=prefill_cache)[:, -1]
        cache = self.model.new_kv_cache(num_samples, seq_len)
        for row in range(num_samples):
            cache.copy_row(prefill_cache, 0, row)
        logits = logits.expand(num_samples, -1)

        settings = sampling_tensors([(temperature, top_k, top_p)] * num_samples, device)
        generators = sample_generators(seed, num_samples)
        states = [SampleState(self.special) for _ in range(num_samples)]
        last_tokens = [0] * num_samples
        for step in range(max_tokens):
            uniforms = draw_uniforms([g if temperature > 0 and s.samples_next else None
                                      for g, s in zip(generators, states)])
            sampled = sample_next_tokens(logits, *settings, uniforms).tolist()
            column, masks = [], []
            for row, state in enumerate(states):
                if state.finished:
                    column.append(last_tokens[row])
                    masks.append(1)
                    continue
                token, mask, code = state.next_token(sampled[row])
                if code is not None:  # runs inline: offline generation has nothing else to do meanwhile
                    state.force_output(self.tokenizer.encode(self.run_tool(code)))
                column.append(token)
                masks.append(mask)
            last_tokens = column
            yield column, masks
            if all(state.finished for state in states) or len(tokens) + step >= seq_len:
                return  # (the cache holds len(tokens) + step positions now; the next forward adds one)
            logits = self.model(torch.tensor(column, device=device)[:, None], kv_cache=cache)[:, -1]

    def generate_batch(self, tokens: list[int], num_samples: int = 1, keep_stop_token: bool = False,
                       **kwargs) -> tuple[list[list[int]], list[list[int]]]:
        """All samples to completion: (token lists, mask lists), each starting with the prompt (mask 0), without
        the stop token unless keep_stop_token (RL trains on it: the policy also learns when to stop)."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for row, (token, mask) in enumerate(zip(column, mask_column)):
                if done[row]:
                    continue
                if token in self.special.stops and mask == 1:
                    done[row] = True
                    if not keep_stop_token:
                        continue
                results[row].append(token)
                masks[row].append(mask)
        return results, masks
