"""Multiple-choice accuracy from letter logits: the scoring that chat evaluation (scripts.chat_eval) and SFT's
periodic validation (scripts.chat_sft) share, so both report the same number for the same model."""

from __future__ import annotations

import torch

from nanochat.common import all_reduce_sum, get_dist_info


def sum_across_ranks(*values: int, device: torch.device) -> list[int]:
    """Counts (passed, total) summed over the ranks."""
    return all_reduce_sum(torch.tensor(values, dtype=torch.long, device=device)).tolist()


@torch.no_grad()
def run_categorical_eval(task, tokenizer, model, batch_size: int, num_problems: int, autocast) -> float:
    """Accuracy of the letter with the highest logit at the last prompt position; only the letters on offer
    compete. Prompts are right-padded into batches (causal attention never sees the padding)."""
    ranks = get_dist_info()
    rank, world_size = ranks.rank, ranks.world_size
    device = model.get_device()
    pad_id = tokenizer.get_bos_token_id()
    letter_ids: dict[str, int] = {}
    indices = list(range(rank, num_problems, world_size))
    passed = 0
    for start in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[start:start + batch_size]]
        prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]
        inputs = torch.full((len(prompts), max(len(p) for p in prompts)), pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            inputs[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        with autocast:
            logits = model(inputs.to(device))
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation["letters"]
            for letter in letters:
                if letter not in letter_ids:
                    ids = tokenizer.encode(letter)
                    if len(ids) != 1:
                        raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens for this tokenizer; "
                                         "categorical evaluation needs single-token letters")
                    letter_ids[letter] = ids[0]
            scores = logits[row, len(prompt) - 1, [letter_ids[letter] for letter in letters]]
            passed += task.evaluate(conversation, letters[int(scores.argmax())])
    passed, total = sum_across_ranks(passed, len(indices), device=device)
    return passed / max(total, 1)
