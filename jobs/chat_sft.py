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
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext

import torch
import torch.distributed as dist

from jobs.mid_train import load_phase_model, restore_training_state, task_mixture, training_state
from vibechat.checkpoint_manager import save_checkpoint
from vibechat.common import (VibechatError, autocast_dtype, compute_cleanup, compute_init, get_base_dir, print0,
                             print_banner, run_main)
from vibechat.metrics import MetricsLogger

OFFLINE_SFT_TASKS = "multiple-choice-standin,arithmetic-standin,conversations-standin,identity," \
                    "simplespelling:300,spellingbee:300"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["mid", "base"], default="mid", help="the model to fine-tune")
    p.add_argument("--tasks", default=OFFLINE_SFT_TASKS,
                   help="comma-separated task names, name:N for the first N examples (default: offline stand-ins)")
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default: the source's largest model)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="conversations are cut to this many tokens (default: the model's context)")
    p.add_argument("--device-batch-size", type=int, default=4, help="conversations per forward pass per rank")
    p.add_argument("--target-examples-per-step", type=int, default=32,
                   help="conversations per optimizer step over all ranks; grad accumulation makes up the difference")
    p.add_argument("--num-epochs", type=int, default=1, help="passes over the mixture (when --num-iterations is -1)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps; -1: from --num-epochs")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--init-lr-frac", type=float, default=0.02, help="peak LR as a fraction of the LRs above")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation loss evaluations")
    p.add_argument("--eval-steps", type=int, default=100, help="batches per validation loss evaluation")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (and one at the end)")
    p.add_argument("--log-every", type=int, default=1, help="steps between progress lines and metric records")
    p.add_argument("--device", default=None, help="cuda | cpu | mps (default: autodetect)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="autocast dtype (auto: bf16 on GPUs that support it, else fp32)")
    return p.parse_args(argv)


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of rendered (ids, mask) rows padded to the longest; a target is the next token where the
    mask marks it as the assistant's, -1 (ignored) elsewhere and on padding."""
    length = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        inputs[i, :n] = torch.tensor(ids[:-1])
        next_ids, trained = torch.tensor(ids[1:]), torch.tensor(mask[1:], dtype=torch.bool)
        targets[i, :n] = torch.where(trained, next_ids, -1)
    return inputs, targets


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


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of a tensor over all ranks (itself outside torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


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


def set_lr(optimizers: list, lr_mult: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult


def main(argv=None) -> None:
    from vibechat.report import get_report

    args = parse_args(argv)
    print_banner()
    ddp, rank, _, world_size, device = compute_init(args.device)
    dtype = autocast_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)

    def autocast_ctx():
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    train_set = task_mixture(args.tasks, "train")
    val_set = task_mixture(args.tasks, "test")
    start = load_phase_model("sft", args.source, args.model_tag, device)
    model, tokenizer, model_tag, meta = start.model, start.tokenizer, start.model_tag, start.meta
    start_step = start.step
    checkpoint_dir = f"{get_base_dir().rstrip('/')}/checkpoints/sft/{model_tag}"
    source_step = meta["source_step"] if start_step else meta["step"]
    max_len = args.max_seq_len or model.config.sequence_len

    B = args.device_batch_size
    if args.target_examples_per_step % (B * world_size):
        raise VibechatError(f"--target-examples-per-step {args.target_examples_per_step} is not a multiple of device "
                            f"batch x ranks = {B * world_size}: change one of them")
    grad_accum_steps = args.target_examples_per_step // (B * world_size)
    num_iterations = args.num_iterations
    if num_iterations <= 0:
        num_iterations = max(1, args.num_epochs * len(train_set) // args.target_examples_per_step)
    print0(f"fine-tuning {model_tag} ({args.source} step {source_step}) on {train_set.name}, {len(train_set):,} "
           f"conversations: {num_iterations} steps of {args.target_examples_per_step} (grad accumulation "
           f"{grad_accum_steps})")

    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"] = group["lr"] * args.init_lr_frac
    loader_state = restore_training_state(optimizers, start.optim_data)
    last_state = {"value": loader_state}

    def batches():
        for x, y, state in sft_batches(train_set, tokenizer, B, max_len, rank, world_size, loader_state, device):
            last_state["value"] = state
            yield x, y

    train_batches = batches()
    metrics = MetricsLogger("sft")
    val_loss = meta.get("val_loss") if start_step else None
    train_seconds = meta.get("train_seconds", 0.0) if start_step else 0.0

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

    def checkpoint(step: int) -> None:
        meta_data = {"step": step, "model_config": model.config.__dict__, "user_config": vars(args),
                     "source": args.source, "source_step": source_step, "num_iterations": num_iterations,
                     "val_loss": val_loss, "train_seconds": train_seconds}
        save_checkpoint(checkpoint_dir, step, model.state_dict(), training_state(optimizers, last_state["value"]),
                        meta_data)
        print0(f"saved checkpoint step {step} to {checkpoint_dir}")

    step = start_step
    while True:
        last = step == num_iterations
        evaluating = val_set is not None and args.eval_every > 0 and (last or step % args.eval_every == 0)
        if evaluating and not (step == start_step and start_step):
            val_loss = evaluate()
            print0(f"step {step}/{num_iterations} | val loss {val_loss:.4f}")
            metrics.log(step=step, val_loss=val_loss)
        if step != start_step and (last or (args.save_every > 0 and step % args.save_every == 0)):
            checkpoint(step)
        if last:
            break
        lr_mult = 1.0 - step / num_iterations
        set_lr(optimizers, lr_mult)
        t0 = time.time()
        micro_batches = [next(train_batches) for _ in range(grad_accum_steps)]
        loss = sft_backward(model, micro_batches, autocast_ctx).item()
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        dt = time.time() - t0
        train_seconds += dt
        step += 1
        if not math.isfinite(loss):
            raise VibechatError(f"loss became {loss} at step {step}: lower the learning rate (--init-lr-frac)")
        if step % args.log_every == 0 or step == num_iterations:
            print0(f"step {step}/{num_iterations} | loss {loss:.4f} | lr {lr_mult:.3f} | dt {dt * 1000:.0f}ms")
            metrics.log(step=step, loss=loss, lr=lr_mult, dt=dt)

    get_report().log(section="Chat SFT", data=[
        vars(args),
        {"model": model_tag, f"{args.source} step": source_step, "iterations": num_iterations,
         "conversations": len(train_set), "final val loss": val_loss,
         "train time (min)": round(train_seconds / 60, 2), "ranks": world_size},
    ])
    if ddp:
        dist.barrier()
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
