"""Supervised fine-tuning phase: train the chat model on the assistant's replies only.

    python -m jobs.chat_sft                                   # from the mid model, offline stand-in mixture
    python -m jobs.chat_sft --source=base                     # midtraining skipped
    torchrun --nproc_per_node=8 -m jobs.chat_sft \\
        --tasks=arc-easy,arc-challenge,gsm8k,smoltalk:10000,identity,simplespelling:300,spellingbee:300

Each row is one conversation, padded to the longest of its batch; the loss counts only the tokens the
assistant writes (render_conversation's mask), averaged over every such token of the optimizer step: over
all its grad-accumulation micro-batches and all ranks together. The LR falls linearly to zero.

Resumes from the newest committed checkpoint of checkpoints/sft/<model_tag>/ with the model, every rank's
optimizer state, each rank's data position and the RNG.
"""

import argparse
import time
from collections.abc import Iterator
from contextlib import nullcontext

import torch
import torch.distributed as dist

from jobs.phase import (ResumableBatches, add_training_args, check_loss, end_phase, eval_due, load_phase_model,
                        progress_line, restore_training_state, save_due, save_training_checkpoint, start_phase)
from jobs.training import (add_tasks_arg, collate, global_sum, make_optimizers, set_lr, step_optimizers,
                           task_mixture)
from vibechat.common import VibechatError, positive_int, print0, run_main, steps_or_auto
from vibechat.metrics import MetricsLogger, system_metrics

OFFLINE_SFT_TASKS = "multiple-choice-standin,arithmetic-standin,conversations-standin,identity," \
                    "simplespelling:300,spellingbee:300"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["mid", "base"], default="mid", help="the model to fine-tune")
    add_tasks_arg(p, default=OFFLINE_SFT_TASKS)
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default: the source's largest model)")
    p.add_argument("--max-seq-len", type=positive_int, default=None,
                   help="conversations are cut to this many tokens (default: the model's context)")
    p.add_argument("--device-batch-size", type=positive_int, default=4, help="conversations per forward pass per rank")
    p.add_argument("--target-examples-per-step", type=int, default=32,
                   help="conversations per optimizer step over all ranks; grad accumulation makes up the difference")
    p.add_argument("--num-epochs", type=int, default=1, help="passes over the mixture (when --num-iterations is -1)")
    p.add_argument("--num-iterations", type=steps_or_auto, default=-1, help="optimizer steps; -1: from --num-epochs")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation loss evaluations")
    p.add_argument("--eval-steps", type=int, default=100, help="batches per validation loss evaluation")
    add_training_args(p, save_every=500, init_lr_frac=0.02)
    return p.parse_args(argv)


def sft_batches(dataset, tokenizer, B: int, max_len: int, rank: int, world_size: int, state: dict | None = None,
                device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """(inputs, targets, state) of B conversations; rank r takes conversations r, r + W, ..., round and round.

    state = {"index": the next conversation}; a generator given it yields what this one would have yielded next.
    """
    pad_id = tokenizer.encode_special("<|assistant_end|>")  # any id: padding is never a target
    index = rank if state is None else state["index"]
    while True:
        rows = []
        for _ in range(B):
            rows.append(tokenizer.render_conversation(dataset[index % len(dataset)], max_tokens=max_len + 1))
            index += world_size
        inputs, targets = collate(rows, pad_id)
        yield inputs.to(device), targets.to(device), {"index": index}


def sft_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-token losses over the supervised targets, number of supervised targets)."""
    return model(inputs, targets, loss_reduction="none").sum(), (targets >= 0).sum()


def sft_backward(model, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                 autocast_ctx=nullcontext) -> torch.Tensor:
    """Backward of one optimizer step's loss; returns that loss (the same on every rank).

    The loss is the mean over every supervised token of the step, on all micro-batches of all ranks. A mean
    per micro-batch or per rank would weigh a token of a batch of short replies above one of long replies.
    """
    num_tokens = global_sum(sum((y >= 0).sum() for _, y in micro_batches)).clamp(min=1)
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    total = torch.zeros((), device=micro_batches[0][0].device)
    for x, y in micro_batches:
        with autocast_ctx():
            loss_sum, _ = sft_loss(model, x, y)
        # the distributed optimizers average gradients over ranks: times world_size makes that the global mean
        (loss_sum * world_size / num_tokens).backward()
        total += loss_sum.detach()
    return global_sum(total) / num_tokens


def main(argv=None) -> None:
    from vibechat.report import get_report

    args = parse_args(argv)
    rank, world_size, device, autocast_ctx = start_phase(args)

    train_set = task_mixture(args.tasks, "train")
    val_set = task_mixture(args.tasks, "test")
    start = load_phase_model("sft", args.source, args.model_tag, device, world_size)
    model, tokenizer, start_step = start.model, start.tokenizer, start.step
    max_len = args.max_seq_len or model.config.sequence_len

    B = args.device_batch_size
    if args.target_examples_per_step % (B * world_size):
        raise VibechatError(f"--target-examples-per-step {args.target_examples_per_step} is not a multiple of device "
                            f"batch x ranks = {B * world_size}: change one of them")
    grad_accum_steps = args.target_examples_per_step // (B * world_size)
    num_iterations = args.num_iterations
    if num_iterations <= 0:
        num_iterations = max(1, args.num_epochs * len(train_set) // args.target_examples_per_step)
    print0(f"fine-tuning {start.model_tag} ({args.source} step {start.source_step}) on {train_set.name}, "
           f"{len(train_set):,} conversations: {num_iterations} steps of {args.target_examples_per_step} "
           f"(grad accumulation {grad_accum_steps})")

    optimizers = make_optimizers(model, args, args.init_lr_frac)
    loader_state = restore_training_state(optimizers, start.optim_data)
    train_batches = ResumableBatches(sft_batches(train_set, tokenizer, B, max_len, rank, world_size, loader_state,
                                                 device), loader_state)
    metrics = MetricsLogger("sft", resume_step=start_step)
    val_loss = start.meta.get("val_loss")
    train_seconds = start.meta.get("train_seconds", 0.0)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        total, count = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
        val_batches = sft_batches(val_set, tokenizer, B, max_len, rank, world_size, device=device)
        for _ in range(args.eval_steps):
            x, y, _ = next(val_batches)
            with autocast_ctx():
                loss_sum, num_tokens = sft_loss(model, x, y)
            total, count = total + loss_sum, count + num_tokens
        model.train()
        return (global_sum(total) / global_sum(count).clamp(min=1)).item()

    step = start_step
    while True:
        last = step == num_iterations
        if val_set is not None and eval_due(step, args.eval_every, start_step, num_iterations):
            val_loss = evaluate()
            print0(progress_line(step, num_iterations, {"val_loss": val_loss}))
            metrics.log(step=step, val_loss=val_loss)
        if save_due(step, args.save_every, start_step, num_iterations):
            save_training_checkpoint(start.checkpoint_dir, step, model, optimizers, train_batches.state, args,
                                     world_size, source=args.source, source_step=start.source_step,
                                     num_iterations=num_iterations, val_loss=val_loss, train_seconds=train_seconds)
        if last:
            break
        lr_mult = 1.0 - step / num_iterations
        set_lr(optimizers, lr_mult)
        t0 = time.time()
        micro_batches = [next(train_batches) for _ in range(grad_accum_steps)]
        loss = sft_backward(model, micro_batches, autocast_ctx).item()
        step_optimizers(optimizers)
        dt = time.time() - t0
        train_seconds += dt
        step += 1
        check_loss(loss, step, "lower the learning rate (--init-lr-frac)")
        if step % args.log_every == 0 or step == num_iterations:
            record = dict(loss=loss, lr=lr_mult, dt=dt)
            print0(progress_line(step, num_iterations, record))
            metrics.log(step=step, **record, **system_metrics(device))

    get_report().log(section="Chat SFT", data=[
        vars(args),
        {"model": start.model_tag, f"{args.source} step": start.source_step, "iterations": num_iterations,
         "conversations": len(train_set), "final val loss": val_loss,
         "train time (min)": round(train_seconds / 60, 2), "ranks": world_size},
    ])
    end_phase()


if __name__ == "__main__":
    run_main(main)
