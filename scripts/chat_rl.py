"""Reinforcement learning on GSM8K: sample answers, reward the correct ones, push the policy towards them.

"GRPO" stripped to what matters for an on-policy run, closer to REINFORCE with a group baseline:
- for each question, sample k completions with the Engine (python tool calls executed, their output forced in);
- reward 1 when the final answer ("#### <number>") is right, else 0;
- advantage = reward - the group's mean reward (no division by the std; no value model);
- loss = -sum(advantage x log-prob of each sampled token) / number of sampled tokens (token-level, as in DAPO),
  over the tokens the model chose: never the prompt, never the tool output the engine forced in;
- no reference model and no KL penalty, no PPO ratio/clipping: every batch is fresh from the current policy.
Every --eval-every steps, pass@k on GSM8K test.

    python -m scripts.chat_rl
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl -- --run=default

Reads the latest SFT checkpoint (--source mid: the midtrained model), writes
$NANOCHAT_BASE_DIR/chatrl_checkpoints/<tag>/.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from nanochat.chat_data import PAD_TOKEN, ConversationStream, collate_padded
from nanochat.checkpoint import rng_state, set_rng_state
from nanochat.common import (
    all_reduce_sum,
    autocast_context,
    compute_cleanup,
    compute_init,
    get_wandb,
    parse_script_args,
    print0,
)
from nanochat.engine import Engine
from nanochat.loss_scaling import LossScaler
from nanochat.training import (
    RunError,
    StepTimer,
    add_optimizer_arguments,
    add_run_arguments,
    add_source_arguments,
    apply_schedule,
    check_every_flags,
    check_run_arguments,
    cli,
    due,
    lr_multiplier,
    open_chat_run,
    save_run_checkpoint,
    setup_optimizers,
    step_line,
)
from report import CHAT_RL, get_report
from tasks.gsm8k import GSM8K

# flags that define the run: --resume with different values would not continue the same run
RUN_DEFINING_FLAGS = dict.fromkeys(["source", "examples_per_step", "num_samples", "device_batch_size",
                                    "max_new_tokens", "temperature", "top_k", "num_steps", "embedding_lr",
                                    "unembedding_lr", "matrix_lr", "weight_decay", "init_lr_frac"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Reinforcement learning on GSM8K (GRPO-style, on-policy)")
    parser.add_argument("--source", default="sft", choices=["sft", "mid"], help="which stage's model to train")
    add_run_arguments(parser, "RL")
    add_source_arguments(parser)
    add_optimizer_arguments(parser, init_lr_frac=0.05)
    # rollouts
    parser.add_argument("--examples-per-step", type=int, default=16, help="questions per step over all ranks")
    parser.add_argument("--num-samples", type=int, default=16, help="completions sampled per question (the group)")
    parser.add_argument("--device-batch-size", type=int, default=8,
                        help="sequences per sampling / forward pass (bounds memory)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest completion")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens (0: all)")
    # schedule
    parser.add_argument("--num-steps", type=int, default=-1, help="optimizer steps (-1: one pass over GSM8K train)")
    # evaluation and checkpoints
    parser.add_argument("--eval-every", type=int, default=60, help="steps between pass@k evaluations (-1: end only)")
    parser.add_argument("--eval-examples", type=int, default=None,
                        help="GSM8K test questions per evaluation (default: 400 on CUDA, 16 elsewhere)")
    parser.add_argument("--save-every", type=int, default=60, help="steps between checkpoints (-1: end only)")
    args = parse_script_args(parser, argv)
    for flag in ("examples_per_step", "num_samples", "device_batch_size", "max_new_tokens"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.num_steps == 0 or args.num_steps < -1:
        parser.error("--num-steps must be >= 1, or -1 for one pass over GSM8K train")
    if args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if args.eval_examples is not None and args.eval_examples < 1:
        parser.error("--eval-examples must be >= 1")
    check_every_flags(parser, args, "eval_every", "save_every")
    check_run_arguments(parser, args)
    return args


# -----------------------------------------------------------------------------
# Rollouts and rewards


def sample_completions(engine: Engine, prompt: list[int], num_samples: int, max_new_tokens: int,
                       temperature: float, top_k: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """num_samples completions of the prompt as (ids, mask) over prompt + completion: mask 0 on the prompt and on
    the tool output the engine forced in, 1 on every token the model sampled, including the token that ended the
    sample (so the policy also learns when to stop)."""
    results, masks = engine.generate_batch(prompt, num_samples=num_samples, keep_stop_token=True,
                                           max_tokens=max_new_tokens, temperature=temperature, top_k=top_k or None,
                                           seed=seed)
    return list(zip(results, masks, strict=True))


def completion_text(engine: Engine, ids: list[int], prompt_length: int) -> str:
    """What the model answered: the completion's text without the stop token."""
    completion = ids[prompt_length:]
    if completion and completion[-1] in engine.special.stops:
        completion = completion[:-1]
    return engine.tokenizer.decode(completion)


def gsm8k_reward(task: GSM8K, conversation: dict, completion: str) -> float:
    """1.0 when the completion's final answer (after '####') equals the reference answer, else 0.0."""
    return float(task.evaluate(conversation, completion))


def policy_gradient_step(model, sequences: list[tuple[list[int], list[int]]], advantages: list[float],
                         device_batch_size: int, pad_id: int, autocast, device: torch.device,
                         scaler: LossScaler | None = None) -> float:
    """Backward of -sum(advantage x log p(sampled token)) / (sampled tokens on all ranks), in passes of
    device_batch_size sequences. Returns that loss (summed over ranks). Masked tokens (prompt, forced tool output,
    padding) contribute nothing."""
    num_sampled = all_reduce_sum(torch.tensor(float(sum(sum(mask[1:]) for _, mask in sequences)), device=device))
    num_sampled = num_sampled.clamp(min=1)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    loss_sum = torch.zeros((), device=device)
    for start in range(0, len(sequences), device_batch_size):
        inputs, targets = collate_padded(sequences[start:start + device_batch_size], pad_id, device)
        batch_advantages = torch.tensor(advantages[start:start + device_batch_size], device=device)
        with autocast:
            token_nll = model(inputs, targets, loss_reduction="none")  # 0 where targets == -1
        # -logp = nll, so the loss is sum(advantage x nll); world_size undoes the optimizers' mean over ranks
        loss = (token_nll.float() * batch_advantages[:, None]).sum() / num_sampled
        loss_to_backward = loss * world_size
        (scaler.scale_loss(loss_to_backward) if scaler else loss_to_backward).backward()
        loss_sum += loss.detach()
    return float(all_reduce_sum(loss_sum))


def sampling_seed(step: int, example_index: int) -> int:
    """A seed per (step, question): a resumed run samples exactly what the interrupted one would have."""
    return (step * 1_000_003 + example_index * 1_009) % 2**31


def sample_group(engine: Engine, prompt: list[int], args: argparse.Namespace, seed: int) -> list:
    """--num-samples completions, sampled --device-batch-size at a time (chunk i uses seed + i)."""
    group = []
    for chunk, start in enumerate(range(0, args.num_samples, args.device_batch_size)):
        count = min(args.device_batch_size, args.num_samples - start)
        group += sample_completions(engine, prompt, count, args.max_new_tokens, args.temperature, args.top_k,
                                    seed + chunk)
    return group


@torch.no_grad()
def pass_at_k(engine: Engine, task: GSM8K, args: argparse.Namespace, num_examples: int, autocast, rank: int,
              world_size: int, device: torch.device) -> list[float]:
    """[pass@1, ..., pass@num_samples] on the first num_examples questions of task: the fraction of questions with
    a correct answer among the first j samples."""
    passed = torch.zeros(args.num_samples, device=device)
    count = torch.zeros((), device=device)
    for index in range(rank, min(num_examples, len(task)), world_size):
        conversation = task[index]
        prompt = engine.tokenizer.render_for_completion(conversation)
        with autocast:
            group = sample_group(engine, prompt, args, sampling_seed(0, index))
        correct = [gsm8k_reward(task, conversation, completion_text(engine, ids, len(prompt))) > 0
                   for ids, _ in group]
        for j in range(args.num_samples):
            passed[j] += any(correct[:j + 1])
        count += 1
    passed, count = all_reduce_sum(passed), all_reduce_sum(count)
    return (passed / count.clamp(min=1)).tolist()


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    dist_info = compute_init(args.device_type or None)
    try:
        return train(args, dist_info)
    finally:
        compute_cleanup()


def train(args: argparse.Namespace, dist_info) -> dict:
    device, rank, world_size, master = dist_info.device, dist_info.rank, dist_info.world_size, dist_info.master
    autocast = autocast_context(dist_info.device_type)
    # evaluation volume: the GPU run's default would take longer than the whole CPU run's training
    args.eval_examples = eval_examples = args.eval_examples or (400 if dist_info.device_type == "cuda" else 16)
    user_config = vars(args).copy()
    wandb_run = get_wandb(args.run, "nanochat-rl", user_config, master)

    run = open_chat_run("rl", args.source, args, RUN_DEFINING_FLAGS, dist_info)
    model, tokenizer, resumed = run.model, run.tokenizer, run.resumed
    start_step = resumed.step if resumed else 0
    loop_state = resumed.meta["loop_state"] if resumed else {"reward": None, "pass_at_k": None, "training_time": 0.0}
    scaler = LossScaler.in_loop_state(dist_info.device_type, loop_state)  # fp16: dynamic loss scaling
    engine = Engine(model, tokenizer, require_confinement=False)  # weaker layers, warned, where no sandbox
    pad_id = tokenizer.encode_special(PAD_TOKEN)

    if args.examples_per_step % world_size != 0:
        raise RunError(f"--examples-per-step={args.examples_per_step} must be a multiple of the number of ranks "
                       f"({world_size})")
    examples_per_rank = args.examples_per_step // world_size
    optimizers = setup_optimizers(model, args, resumed.optimizer_states if resumed else None)

    train_task = GSM8K(subset="main", split="train")
    val_task = GSM8K(subset="main", split="test")
    num_steps = args.num_steps if args.num_steps > 0 else len(train_task) // args.examples_per_step
    if num_steps < 1:
        raise RunError(f"GSM8K train has {len(train_task)} questions, fewer than one step of --examples-per-step="
                       f"{args.examples_per_step}: lower it or give --num-steps")
    stream = ConversationStream(train_task, rank, world_size)
    if resumed is not None:
        stream.position = resumed.rank_state["data"]["position"]
        set_rng_state(resumed.rank_state["rng"], device)
    print0(f"{num_steps} steps of {args.examples_per_step} questions x {args.num_samples} samples")

    def evaluate(step: int) -> None:
        passk = pass_history[step] = loop_state["pass_at_k"] = pass_at_k(engine, val_task, args, eval_examples,
                                                                         autocast, rank, world_size, device)
        print0(f"step {step:05d} | GSM8K test ({eval_examples} questions) pass@1 {passk[0]:.4f} | "
               f"pass@{args.num_samples} {passk[-1]:.4f}")
        get_report().log_metrics("chat_rl", {"step": step, "pass@1": passk[0], f"pass@{args.num_samples}": passk[-1]})
        wandb_run.log({"step": step, **{f"pass@{k + 1}": value for k, value in enumerate(passk)}})

    def save(step: int) -> None:
        save_run_checkpoint("rl", run.directory, step, model, optimizers, tokenizer,
                            {"data": {"position": stream.position}, "rng": rng_state(device)},
                            {"source": run.source, "loop_state": loop_state, "user_config": user_config}, rank,
                            keep=args.keep_checkpoints)

    losses: dict[int, float] = {}
    rewards: dict[int, float] = {}
    pass_history: dict[int, list[float]] = {}
    timer = StepTimer(dist_info.device_type)
    step = start_step
    while True:
        last_step = step >= num_steps
        if last_step:  # on disk before the final evaluation, whatever happens in it
            save(step)
        if last_step or due(args.eval_every, step):
            evaluate(step)
        if not last_step and step > start_step and due(args.save_every, step):
            save(step)
        if last_step:
            break

        # rollouts: a group of samples per question, advantages relative to the group's mean reward
        timer.begin()
        sequences, advantages, step_rewards, lengths = [], [], [], []
        for _ in range(examples_per_rank):
            position, conversation = stream.take()
            prompt = tokenizer.render_for_completion(conversation)
            with torch.no_grad(), autocast:
                group = sample_group(engine, prompt, args, sampling_seed(step, stream.index(position)))
            group_rewards = [gsm8k_reward(train_task, conversation, completion_text(engine, ids, len(prompt)))
                             for ids, _ in group]
            mean_reward = sum(group_rewards) / len(group_rewards)
            sequences += group
            advantages += [reward - mean_reward for reward in group_rewards]
            step_rewards += group_rewards
            lengths += [len(ids) - len(prompt) for ids, _ in group]

        lrm = lr_multiplier(step, num_steps, warmdown_ratio=1.0)  # linear decay to zero
        apply_schedule(optimizers, lrm, step)
        loss = policy_gradient_step(model, sequences, advantages, args.device_batch_size, pad_id, autocast, device,
                                    scaler)
        scaler.step(optimizers, model)
        model.zero_grad(set_to_none=True)
        step += 1
        dt, counts = timer.end(step - start_step)

        totals = all_reduce_sum(torch.tensor([sum(step_rewards), sum(lengths), len(step_rewards)], device=device,
                                             dtype=torch.float64))
        mean_reward, mean_length = float(totals[0] / totals[2]), float(totals[1] / totals[2])
        losses[step], rewards[step] = loss, mean_reward
        loop_state["reward"] = mean_reward
        loop_state["training_time"] += dt if counts else 0.0
        tokens = int(all_reduce_sum(torch.tensor(sum(len(ids) for ids, _ in sequences), device=device)))
        print0(step_line(step, num_steps, loss, lrm, dt, tokens, None, None, world_size, loop_state["training_time"],
                         f"reward {mean_reward:.4f} | completion length {mean_length:.1f}"))
        get_report().log_metrics("chat_rl", {"step": step, "reward": mean_reward, "train_loss": loss,
                                             "completion_length": mean_length})
        wandb_run.log({"step": step, "reward": mean_reward, "loss": loss, "completion_length": mean_length})

    passk = loop_state["pass_at_k"]
    get_report().log(CHAT_RL, [
        user_config,
        {"source model": f"{run.source['stage']} {run.source['tag']} step {run.source['step']}",
         "GSM8K train questions": len(train_task), "samples per question": args.num_samples},
        {"steps": step, "final mean reward": loop_state["reward"], "evaluation questions": eval_examples,
         "final pass@1": passk[0], f"final pass@{args.num_samples}": passk[-1],
         "training time (min)": loop_state["training_time"] / 60},
    ])
    wandb_run.finish()
    return {"losses": losses, "rewards": rewards, "pass_at_k": pass_history, "tag": run.tag}


if __name__ == "__main__":
    cli(main)
