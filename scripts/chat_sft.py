"""Supervised finetuning (SFT): polish the midtrained model on single conversations.

Unlike midtraining, each conversation gets its own row (padded, never packed next to another), as at chat time,
and the loss covers only the assistant's tokens. The mixture: ARC-Easy/Challenge (multiple choice), GSM8K (math
with tool calls), a slice of SmolTalk (chat), identity and a little spelling. The learning rate starts at a small
fraction of pretraining's and decays linearly to zero. Validation: loss on held-out chat conversations and
multiple-choice accuracy on the ARC test sets (the letter with the highest logit).

    python -m scripts.chat_sft
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft
    python -m scripts.chat_sft --lora-rank 8            # LoRA: train low-rank adapters, the base model frozen
    python -m scripts.chat_sft --merge --model-tag d20  # fold a LoRA checkpoint into a full one, under d20-merged

Reads the latest mid checkpoint (--source base: the base model), writes $NANOCHAT_BASE_DIR/chatsft_checkpoints/<tag>/.
A LoRA checkpoint holds only the adapters and names its base checkpoint (nanochat/lora.py); every script loads it as
an ordinary model, as long as that base checkpoint is still there.
"""

from __future__ import annotations

import argparse

from nanochat import lora
from nanochat.categorical_eval import run_categorical_eval
from nanochat.chat_data import ConversationStream, PaddedBatcher, merge_stats
from nanochat.checkpoint import (
    base_reference,
    gather_rank_states,
    merged_lora_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from nanochat.common import autocast_context, compute_cleanup, compute_init, get_wandb, parse_script_args, print0
from nanochat.gpt import peak_flops
from nanochat.loss_scaling import LossScaler
from nanochat.training import (
    OPTIMIZER_VARIANT_FLAGS,
    RunError,
    StepTimer,
    add_optimizer_arguments,
    add_run_arguments,
    add_source_arguments,
    apply_schedule,
    check_every_flags,
    check_run_arguments,
    checkpoint_dir,
    cli,
    compile_policy,
    due,
    evaluate_loss,
    lr_multiplier,
    min_or_none,
    open_chat_run,
    save_run_checkpoint,
    set_aside_previous_run,
    setup_optimizers,
    source_tag,
    step_line,
    supervised_step,
)
from report import CHAT_SFT, get_report
from tasks.arc import ARC
from tasks.common import TaskMixture, load_tasks, require_tasks
from tasks.custom import add_conversation_arguments, check_conversation_arguments, custom_tasks
from tasks.gsm8k import GSM8K
from tasks.identity import IdentityConversations
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import sized_beside

# flags that define the run: --resume with different values would not continue the same run
RUN_DEFINING_FLAGS = dict.fromkeys(["source", "max_seq_len", "device_batch_size", "examples_per_step",
                                    "num_iterations", "embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay",
                                    "init_lr_frac", "lora_rank", "lora_alpha", "lora_targets", "lora_lr"])
# --merge writes the full checkpoint of LoRA tag T under the tag T + this: a step of T itself would become the run's
# last step (what --resume and --keep-checkpoints act on), and T's LoRA steps would stay what T means
MERGED_TAG_SUFFIX = "-merged"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Supervised finetuning on single conversations")
    parser.add_argument("--source", default="mid", choices=["mid", "base"], help="which stage's model to finetune")
    add_run_arguments(parser, "SFT")
    add_source_arguments(parser)
    add_conversation_arguments(parser)
    add_optimizer_arguments(parser, init_lr_frac=0.02)
    # batch
    parser.add_argument("--max-seq-len", type=int, default=2048,
                        help="longest conversation, in tokens (longer ones are truncated, and counted)")
    parser.add_argument("--device-batch-size", type=int, default=4, help="conversations per forward pass per GPU")
    parser.add_argument("--examples-per-step", type=int, default=32,
                        help="conversations per optimizer step over all ranks (gradient accumulation makes up "
                             "the rest)")
    # schedule
    parser.add_argument("--num-iterations", type=int, default=-1,
                        help="optimizer steps (-1: one pass over the mixture)")
    # evaluation and checkpoints
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validation losses (-1: end only)")
    parser.add_argument("--eval-steps", type=int, default=None,
                        help="validation batches per rank per evaluation (default: 100 on CUDA, 10 elsewhere)")
    parser.add_argument("--eval-metrics-every", type=int, default=200,
                        help="steps between multiple-choice accuracy evaluations (-1: end only)")
    parser.add_argument("--eval-metrics-max-problems", type=int, default=None,
                        help="problems per ARC subset (default: 1024 on CUDA, 100 elsewhere)")
    parser.add_argument("--save-every", type=int, default=-1, help="steps between checkpoints (-1: end only)")
    lora.add_lora_arguments(parser)
    parser.add_argument("--merge", action="store_true",
                        help=f"fold the LoRA SFT checkpoint of --model-tag (default: the largest) and --step (default: "
                             f"the last) into a full one under the tag <tag>{MERGED_TAG_SUFFIX}, and exit")
    args = parse_script_args(parser, argv)
    if args.merge and (args.resume or args.lora_rank is not None):
        parser.error("--merge folds an existing LoRA checkpoint (--model-tag, --step): it takes no --resume or "
                     "--lora-* flags")
    for flag in ("max_seq_len", "device_batch_size", "examples_per_step", "eval_steps", "eval_metrics_max_problems"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.num_iterations == 0 or args.num_iterations < -1:
        parser.error("--num-iterations must be >= 1, or -1 for one pass over the mixture")
    check_every_flags(parser, args, "eval_every", "eval_metrics_every", "save_every")
    check_run_arguments(parser, args)
    check_conversation_arguments(parser, args)
    lora.check_lora_arguments(parser, args)
    variants = [flag for flag, off in OPTIMIZER_VARIANT_FLAGS.items() if getattr(args, flag, off) != off]
    if args.lora_rank is not None and variants:  # the adapters train with plain AdamW: the flag would do nothing
        parser.error(f"--{variants[0].replace('_', '-')} is an option of the full model's optimizers; LoRA trains "
                     "its adapters with AdamW (--lora-lr): drop it, or leave out --lora-rank")
    return args


# -----------------------------------------------------------------------------
# The data


def train_mixture(custom: dict[str, object], mix: str,
                  identity: str | None = None) -> tuple[TaskMixture, dict[str, int], dict[str, str]]:
    factories = {
        "ARC-Easy": lambda: ARC(subset="ARC-Easy", split="train"),  # 2.3K rows upstream
        "ARC-Challenge": lambda: ARC(subset="ARC-Challenge", split="train"),  # 1.1K
        "GSM8K": lambda: GSM8K(subset="main", split="train"),  # 8K
        "SmolTalk": lambda: SmolTalk(split="train", stop=10_000),  # 10K of the 460K
        "identity": lambda: IdentityConversations(size=1000, identity=identity),
    }
    tasks, missing = load_tasks(factories if mix == "default" else {}, "SFT mixture")
    tasks.update(custom)  # --conversations, already checked line by line
    if mix == "default":  # keeps the skill midtraining taught: 300 beside ARC, GSM8K and the SmolTalk slice upstream
        tasks["SpellingBee"] = sized_beside(tasks, full_rows=300, real_full_rows=2_251 + 1_119 + 7_473 + 10_000)
    require_tasks(tasks, missing, "SFT mixture")
    return TaskMixture(list(tasks.values())), {name: len(task) for name, task in tasks.items()}, missing


def mc_tasks(max_problems: int) -> dict[str, object]:
    factories = {subset: (lambda subset=subset: ARC(subset=subset, split="test", stop=max_problems))
                 for subset in ("ARC-Easy", "ARC-Challenge")}
    tasks, _ = load_tasks(factories, "SFT multiple-choice evaluation")
    return tasks


# -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    dist_info = compute_init(args.device_type or None)
    try:
        return train(args, dist_info)
    finally:
        compute_cleanup()


def train(args: argparse.Namespace, dist_info) -> dict:
    device, rank, world_size, master = dist_info.device, dist_info.rank, dist_info.world_size, dist_info.master
    autocast = autocast_context(dist_info.device_type)
    # evaluation volume: the GPU run's defaults would take longer than the whole CPU run's training
    on_cuda = dist_info.device_type == "cuda"
    args.eval_steps = args.eval_steps or (100 if on_cuda else 10)
    args.eval_metrics_max_problems = args.eval_metrics_max_problems or (1024 if on_cuda else 100)
    user_config = vars(args).copy()
    wandb_run = get_wandb(args.run, "nanochat-sft", user_config, master)

    custom = custom_tasks(args.conversations)  # a bad line stops the run here, before anything is touched
    run = open_chat_run("sft", args.source, args, RUN_DEFINING_FLAGS, dist_info)
    model, tokenizer, resumed = run.model, run.tokenizer, run.resumed
    lora_settings = lora.settings_from_args(args)
    lora_meta = None
    if lora_settings is not None:  # a resumed LoRA run's model already carries its adapters (build_model)
        lora_meta = resumed.meta["lora"] if resumed else lora.lora_meta(lora_settings, base_reference(run.source))
        if not resumed:
            lora.apply_lora(model, lora_settings)
        print0(lora.describe(model, lora_settings))
    start_step = resumed.step if resumed else 0
    loop_state = (resumed.meta["loop_state"] if resumed else
                  {"val_loss": None, "min_val_loss": None, "train_loss": None, "mc_accuracy": {}, "training_time": 0.0})
    # rows are padded to the longest conversation of their batch: a new shape nearly every step
    train_model = compile_policy(model, args.compile, dist_info.device_type, default_on_cuda=False)
    scaler = LossScaler.in_loop_state(dist_info.device_type, loop_state)  # fp16: dynamic loss scaling

    rows_per_micro_batch = args.device_batch_size * world_size
    if args.examples_per_step % rows_per_micro_batch != 0:
        raise RunError(f"--examples-per-step={args.examples_per_step} must be a multiple of --device-batch-size x "
                       f"ranks = {rows_per_micro_batch}")
    grad_accum_steps = args.examples_per_step // rows_per_micro_batch
    optimizer_states = resumed.optimizer_states if resumed else None
    optimizers = (lora.setup_optimizers(model, args.lora_lr, args.weight_decay, optimizer_states) if lora_settings
                  else setup_optimizers(model, args, optimizer_states))

    train_task, train_sizes, train_missing = train_mixture(custom, args.mix, args.identity)
    val_task = SmolTalk(split="test")
    mc = mc_tasks(args.eval_metrics_max_problems)
    num_iterations = args.num_iterations if args.num_iterations > 0 else len(train_task) // args.examples_per_step
    if num_iterations < 1:
        raise RunError(f"the SFT mixture has {len(train_task)} conversations, fewer than one step of "
                       f"--examples-per-step={args.examples_per_step}: lower it or give --num-iterations")
    print0(f"SFT mixture: {len(train_task):,} conversations ({train_sizes}); {num_iterations} steps of "
           f"{args.examples_per_step} ({grad_accum_steps} accumulation steps)")
    batcher = PaddedBatcher(ConversationStream(train_task, rank, world_size), tokenizer, args.max_seq_len,
                            state=resumed.rank_state["data"] if resumed else None)
    if resumed is not None:
        set_rng_state(resumed.rank_state["rng"], device)

    def validation_loss(step: int) -> None:
        val_batcher = PaddedBatcher(ConversationStream(val_task, rank, world_size), tokenizer, args.max_seq_len)
        batches = (val_batcher.next_batch(args.device_batch_size, device) for _ in range(args.eval_steps))
        val_loss = val_losses[step] = evaluate_loss(train_model, batches, autocast)
        loop_state["val_loss"], loop_state["min_val_loss"] = val_loss, min_or_none(val_loss, loop_state["min_val_loss"])
        print0(f"step {step:05d} | validation loss {val_loss:.4f}")
        get_report().log_metrics("chat_sft", {"step": step, "val_loss": val_loss})
        wandb_run.log({"step": step, "val/loss": val_loss})

    def multiple_choice_accuracy(step: int) -> None:
        accuracy = {name: run_categorical_eval(task, tokenizer, model, args.device_batch_size, len(task), autocast)
                    for name, task in mc.items()}
        loop_state["mc_accuracy"] = accuracy
        print0(f"step {step:05d} | " + ", ".join(f"{name} accuracy {acc:.4f}" for name, acc in accuracy.items()))
        get_report().log_metrics("chat_sft", {"step": step, **{f"{name} accuracy": acc
                                                               for name, acc in accuracy.items()}})
        wandb_run.log({"step": step, **{f"mc/{name}": acc for name, acc in accuracy.items()}})

    def save(step: int) -> None:
        save_run_checkpoint("sft", run.directory, step, model, optimizers, tokenizer,
                            {"data": batcher.state_dict(), "rng": rng_state(device)},
                            {"source": run.source, "loop_state": loop_state, "user_config": user_config,
                             **({"lora": lora_meta} if lora_meta else {})}, rank, keep=args.keep_checkpoints,
                            model_state=(lambda: lora.adapter_state(model)) if lora_meta else None)

    flops_per_token = lora.estimate_flops(model) if lora_settings else model.estimate_flops()
    peak = peak_flops(device)
    train_losses: dict[int, float] = {}
    val_losses: dict[int, float] = {}
    timer = StepTimer(dist_info.device_type)
    step = start_step
    while True:
        last_step = step >= num_iterations
        if last_step:  # on disk before the final evaluations, whatever happens in them
            save(step)
        if last_step or due(args.eval_every, step):
            validation_loss(step)
        if last_step or due(args.eval_metrics_every, step):
            multiple_choice_accuracy(step)
        if not last_step and step > start_step and due(args.save_every, step):
            save(step)
        if last_step:
            break

        timer.begin()
        micro_batches = [batcher.next_batch(args.device_batch_size, device) for _ in range(grad_accum_steps)]
        lrm = lr_multiplier(step, num_iterations, warmdown_ratio=1.0)  # linear decay to zero
        apply_schedule(optimizers, lrm, step)
        train_loss = supervised_step(train_model, micro_batches, autocast, scaler)
        scaler.step(optimizers, model)
        model.zero_grad(set_to_none=True)
        step += 1
        dt, counts = timer.end(step - start_step)
        train_losses[step] = loop_state["train_loss"] = train_loss
        loop_state["training_time"] += dt if counts else 0.0
        tokens = sum(inputs.numel() for inputs, _ in micro_batches) * world_size
        supervised = sum(int((targets >= 0).sum()) for _, targets in micro_batches)
        print0(step_line(step, num_iterations, train_loss, lrm, dt, tokens, flops_per_token, peak, world_size,
                         loop_state["training_time"], f"supervised tokens/rank {supervised:,}"))
        get_report().log_metrics("chat_sft", {"step": step, "train_loss": train_loss})
        wandb_run.log({"step": step, "train/loss": train_loss, "train/lrm": lrm})

    stats = merge_stats(state["stats"] for state in gather_rank_states(batcher.state_dict()))
    get_report().log(CHAT_SFT, [
        user_config,
        {"source model": f"{run.source['stage']} {run.source['tag']} step {run.source['step']}",
         "training mixture": {**train_sizes, "total": len(train_task)},
         "tasks left out": ", ".join(train_missing) or "none",
         "trained weights": lora.describe(model, lora_settings) if lora_settings else "all (full finetuning)"},
        {"conversations trained on": stats.conversations, "conversations truncated": stats.truncated,
         "conversations dropped": stats.dropped, "supervised tokens": stats.supervised_tokens},
        {"steps": step, "final train loss": loop_state["train_loss"], "final validation loss": loop_state["val_loss"],
         "minimum validation loss": loop_state["min_val_loss"],
         **{f"{name} accuracy": acc for name, acc in loop_state["mc_accuracy"].items()},
         "training time (min)": loop_state["training_time"] / 60},
    ])
    wandb_run.finish()
    return {"train_losses": train_losses, "val_losses": val_losses, "mc_accuracy": loop_state["mc_accuracy"],
            "tag": run.tag, "stats": stats, "lora": lora_meta}


def merge(args: argparse.Namespace) -> dict:
    """--merge: the LoRA checkpoint folded into a full SFT checkpoint (same step) under <tag>-merged, written
    atomically; an earlier merge of that tag is set aside, not overwritten."""
    tag = source_tag("sft", args.model_tag)
    model_state, meta = merged_lora_checkpoint(checkpoint_dir("sft", tag), args.step)
    merged_tag = tag + MERGED_TAG_SUFFIX
    directory = checkpoint_dir("sft", merged_tag)
    set_aside_previous_run(directory, master=True)
    save_checkpoint(directory, meta["step"], model_state, None, meta)
    print0(f"merged the LoRA checkpoint {tag} step {meta['step']} into {directory}: load it with --tag "
           f"{merged_tag} (python -m scripts.chat_cli --tag {merged_tag})")
    return {"tag": merged_tag, "step": meta["step"], "directory": directory}


if __name__ == "__main__":
    cli(main)
