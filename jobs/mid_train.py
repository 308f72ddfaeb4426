"""Midtraining phase: teach the base model the chat format, tool use and multiple choice.

    python -m jobs.mid_train --device-batch-size=4           # offline stand-in mixture, one process
    torchrun --nproc_per_node=8 -m jobs.mid_train \\
        --tasks=smoltalk,mmlu-auxiliary-train,gsm8k,identity,identity,simplespelling,spellingbee

Continues training the newest base checkpoint on a mixture of conversations (--tasks: registry names,
name:N for the first N examples, a name listed twice is oversampled), rendered with the chat special
tokens and packed into rows like pretraining text: every token is trained on. The LR stays constant, then
falls linearly to zero over the last --warmdown-ratio of the steps.

Resumes from the newest committed checkpoint of checkpoints/mid/<model_tag>/ with the model, every rank's
optimizer state, each rank's data position and the RNG, so that a killed run continues exactly.
"""

import argparse
import time
from collections.abc import Iterator

import torch

from jobs.phase import (ResumableBatches, add_token_rows_args, add_training_args, check_loss, compiled, end_phase,
                        eval_bpb, eval_due, load_phase_model, progress_line, restore_training_state, save_due,
                        save_training_checkpoint, start_phase)
from jobs.training import (add_tasks_arg, grad_accumulation, lr_multiplier, make_optimizers, set_schedules,
                           task_mixture, train_step)
from vibechat.common import positive_int, print0, run_main, steps_or_auto, synchronize
from vibechat.metrics import MetricsLogger, system_metrics

OFFLINE_MID_TASKS = "conversations-standin,multiple-choice-standin,arithmetic-standin,identity,identity," \
                    "simplespelling,spellingbee"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tasks_arg(p, default=OFFLINE_MID_TASKS)
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default: the largest base model)")
    p.add_argument("--max-seq-len", type=positive_int, default=None,
                   help="row length in tokens (default: the model's context)")
    p.add_argument("--device-batch-size", type=positive_int, default=32, help="rows per forward pass per rank")
    p.add_argument("--num-iterations", type=steps_or_auto, default=-1,
                   help="optimizer steps; -1: one pass over the mixture (estimated from a sample of it)")
    p.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps of linear LR decay to zero")
    p.add_argument("--eval-every", type=int, default=150, help="steps between validation bpb evaluations")
    add_token_rows_args(p)
    add_training_args(p, save_every=500, init_lr_frac=1.0)
    return p.parse_args(argv)


def conversation_batches(dataset, tokenizer, B: int, T: int, rank: int, world_size: int, state: dict | None = None,
                         device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
    """(inputs, targets, state): (B, T) rows packed from rendered conversations, targets the inputs shifted by one.

    Rank r renders conversations r, r + W, r + 2W, ... of the dataset, going round it as often as needed.
    state = {"index": next conversation to render, "buffer": tokens rendered but not yet yielded}; a generator
    given it as `state` yields exactly the batches this one would have yielded next.
    """
    index = rank if state is None else state["index"]
    buffer = [] if state is None else list(state["buffer"])
    needed = B * T + 1  # the last token is only a target, and comes back as the next batch's first input
    while True:
        while len(buffer) < needed:
            ids, _ = tokenizer.render_conversation(dataset[index % len(dataset)])
            buffer.extend(ids)
            index += world_size
        rows = torch.tensor(buffer[:needed], dtype=torch.long)
        del buffer[:B * T]
        yield rows[:-1].view(B, T).to(device), rows[1:].view(B, T).to(device), {"index": index, "buffer": list(buffer)}


def estimate_iterations(dataset, tokenizer, total_batch_size: int) -> int:
    """Optimizer steps for one pass over the dataset, its size in tokens estimated from up to 1000 conversations."""
    sample = range(0, len(dataset), max(1, len(dataset) // 1000))
    mean_tokens = sum(len(tokenizer.render_conversation(dataset[i])[0]) for i in sample) / len(sample)
    return max(1, round(mean_tokens * len(dataset) / total_batch_size))


def main(argv=None) -> None:
    from vibechat.report import get_report
    from vibechat.tokenizer import get_token_bytes

    args = parse_args(argv)
    rank, world_size, device, autocast_ctx = start_phase(args)

    train_set = task_mixture(args.tasks, "train")
    val_set = task_mixture(args.tasks, "test")
    start = load_phase_model("mid", "base", args.model_tag, device, world_size)
    model, tokenizer, start_step = start.model, start.tokenizer, start.step
    token_bytes = get_token_bytes(device=device)

    B, T = args.device_batch_size, args.max_seq_len or model.config.sequence_len
    tokens_per_fwdbwd = B * T * world_size
    grad_accum_steps = grad_accumulation(args.total_batch_size, tokens_per_fwdbwd)
    num_iterations = args.num_iterations
    if num_iterations <= 0:
        num_iterations = estimate_iterations(train_set, tokenizer, args.total_batch_size)
    print0(f"midtraining {start.model_tag} (base step {start.source_step}) on {train_set.name}, "
           f"{len(train_set):,} conversations: {num_iterations} steps of {args.total_batch_size:,} tokens "
           f"(grad accumulation {grad_accum_steps})")

    optimizers = make_optimizers(model, args, args.init_lr_frac)
    loader_state = restore_training_state(optimizers, start.optim_data)
    train_model = compiled(model, args.compile, device)
    train_batches = ResumableBatches(conversation_batches(train_set, tokenizer, B, T, rank, world_size, loader_state,
                                                          device), loader_state)
    metrics = MetricsLogger("mid", resume_step=start_step)
    eval_steps = max(1, args.eval_tokens // tokens_per_fwdbwd)
    smooth_loss = start.meta.get("smooth_loss", 0.0)
    val_bpb = start.meta.get("val_bpb")
    train_seconds = start.meta.get("train_seconds", 0.0)

    step = start_step
    while True:
        last = step == num_iterations
        if val_set is not None and eval_due(step, args.eval_every, start_step, num_iterations):
            val_batches = ((x, y) for x, y, _ in conversation_batches(val_set, tokenizer, B, T, rank, world_size,
                                                                      device=device))
            val_bpb = eval_bpb(model, val_batches, eval_steps, token_bytes, autocast_ctx)
            print0(progress_line(step, num_iterations, {"val_bpb": val_bpb}))
            metrics.log(step=step, val_bpb=val_bpb)
        if save_due(step, args.save_every, start_step, num_iterations):
            save_training_checkpoint(start.checkpoint_dir, step, model, optimizers, train_batches.state, args,
                                     world_size, source_step=start.source_step, num_iterations=num_iterations,
                                     smooth_loss=smooth_loss, val_bpb=val_bpb, train_seconds=train_seconds)
        if last:
            break
        lr_mult = lr_multiplier(step, num_iterations, 0.0, args.warmdown_ratio, 0.0)
        set_schedules(optimizers, step, lr_mult)
        synchronize(device)
        t0 = time.time()
        loss_value = train_step(train_model, optimizers, train_batches, grad_accum_steps, autocast_ctx).item()
        dt = time.time() - t0
        if step > start_step + 1:
            train_seconds += dt  # the first steps include compilation
        step += 1
        smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
        debiased = smooth_loss / (1 - 0.9 ** step)
        check_loss(loss_value, step, "lower the learning rates (--init-lr-frac)")
        if step % args.log_every == 0 or step == num_iterations:
            record = dict(loss=debiased, raw_loss=loss_value, lr=lr_mult, dt=dt,
                          tok_per_sec=args.total_batch_size / dt)
            print0(progress_line(step, num_iterations, record))
            metrics.log(step=step, **record, **system_metrics(device))

    get_report().log(section="Midtraining", data=[
        vars(args),
        {"model": start.model_tag, "base step": start.source_step, "iterations": num_iterations,
         "tokens": num_iterations * args.total_batch_size, "conversations": len(train_set),
         "final val bpb": val_bpb, "train time (min)": round(train_seconds / 60, 2), "ranks": world_size},
    ])
    end_phase()


if __name__ == "__main__":
    run_main(main)
