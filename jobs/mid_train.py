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
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from jobs.base_train import lr_multiplier, set_schedules, train_step
from tasks.common import TaskMixture
from tasks.registry import TASKS, get_task, task_parameters
from vibechat.checkpoint_manager import (build_model, find_largest_model, find_last_step, load_checkpoint, load_model,
                                         save_checkpoint)
from vibechat.common import (VibechatError, autocast_dtype, compute_cleanup, compute_init, get_base_dir, print0,
                             print_banner, run_main)
from vibechat.gpt import GPT
from vibechat.metrics import MetricsLogger
from vibechat.tokenizer import RustBPETokenizer, get_tokenizer

OFFLINE_MID_TASKS = "conversations-standin,multiple-choice-standin,arithmetic-standin,identity,identity," \
                    "simplespelling,spellingbee"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=OFFLINE_MID_TASKS,
                   help="comma-separated task names, name:N for the first N examples (default: offline stand-ins)")
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default: the largest base model)")
    p.add_argument("--max-seq-len", type=int, default=None, help="row length in tokens (default: the model's context)")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass per rank")
    p.add_argument("--total-batch-size", type=int, default=524288,
                   help="tokens per optimizer step over all ranks; grad accumulation makes up the difference")
    p.add_argument("--num-iterations", type=int, default=-1,
                   help="optimizer steps; -1: one pass over the mixture (estimated from a sample of it)")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--init-lr-frac", type=float, default=1.0, help="peak LR as a fraction of the LRs above")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps of linear LR decay to zero")
    p.add_argument("--eval-every", type=int, default=150, help="steps between validation bpb evaluations")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per evaluation")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (and one at the end)")
    p.add_argument("--log-every", type=int, default=1, help="steps between progress lines and metric records")
    p.add_argument("--device", default=None, help="cuda | cpu | mps (default: autodetect)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile (auto: on CUDA)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="autocast dtype (auto: bf16 on GPUs that support it, else fp32)")
    return p.parse_args(argv)


def task_mixture(spec: str, split: str) -> TaskMixture | None:
    """The tasks of a spec such as "smoltalk,gsm8k:2000,identity" shuffled together, built for `split`.

    For split "test", tasks with no test split (identity, mmlu-auxiliary-train) are left out; None if none is left.
    """
    tasks = []
    for item in spec.split(","):
        name, _, count = item.strip().partition(":")
        if count and not (count.isdigit() and int(count) > 0):
            raise VibechatError(f"task {item!r}: the count after ':' must be a positive number of examples")
        cls, fixed = TASKS.get(name, (None, {}))
        takes_split = cls is not None and "split" in task_parameters(cls) and "split" not in fixed
        if split != "train" and cls is not None and not takes_split:
            continue
        kwargs = {"split": split} if takes_split else {}
        if count:
            kwargs["stop"] = int(count)
        tasks.append(get_task(name, **kwargs))  # an unknown name is an error that lists the known ones
    if not tasks:
        if split == "train":
            raise VibechatError(f"--tasks {spec!r} names no task: give comma-separated task names")
        return None
    return TaskMixture(tasks)


@dataclass
class PhaseStart:
    """Where a post-training phase starts: its own newest checkpoint (resuming), else the source phase's newest."""

    model: GPT
    tokenizer: RustBPETokenizer
    model_tag: str
    step: int  # 0 when starting from the source
    optim_data: dict | None  # this rank's {"optimizers", "loader_state", "rng"} when resuming
    meta: dict  # of the checkpoint loaded: the phase's own when resuming, else the source's


def largest_model_tag(checkpoint_root: str) -> str | None:
    try:
        return find_largest_model(checkpoint_root)
    except FileNotFoundError:
        return None


def load_phase_model(phase: str, source: str, model_tag: str | None, device) -> PhaseStart:
    """The model a post-training phase trains; without a checkpoint to start from, load_model's error names the
    program to run first. The model tag defaults to the phase's largest model, else the source's."""
    root = f"{get_base_dir().rstrip('/')}/checkpoints"
    model_tag = model_tag or largest_model_tag(f"{root}/{phase}") or largest_model_tag(f"{root}/{source}")
    if model_tag is not None:
        own_dir = f"{root}/{phase}/{model_tag}"
        try:
            start_step = find_last_step(own_dir)
        except FileNotFoundError:
            start_step = 0
        if start_step:
            model_data, optim_data, meta = load_checkpoint(own_dir, start_step, device, load_optimizer=True)
            print0(f"resuming from step {start_step} of {own_dir}")
            model = build_model(model_data, meta, device, "train")
            return PhaseStart(model, get_tokenizer(), model_tag, start_step, optim_data, meta)
    model, tokenizer, meta = load_model(source, device, "train", model_tag)
    return PhaseStart(model, tokenizer, model_tag, 0, None, meta)


def training_state(optimizers: list, loader_state) -> dict:
    """What a rank saves beside the model: optimizer states, its data position, its RNG."""
    return {"optimizers": [opt.state_dict() for opt in optimizers], "loader_state": loader_state,
            "rng": {"cpu": torch.get_rng_state()}}


def restore_training_state(optimizers: list, optim_data: dict | None):
    """Load a rank's saved optimizer states and RNG; returns its data position (None when starting afresh)."""
    if optim_data is None:
        return None
    for opt, state in zip(optimizers, optim_data["optimizers"]):
        opt.load_state_dict(state)
    torch.set_rng_state(optim_data["rng"]["cpu"].cpu())  # load_checkpoint maps every tensor to the training device
    return optim_data["loader_state"]


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
    from vibechat.loss_eval import evaluate_bpb
    from vibechat.report import get_report
    from vibechat.tokenizer import get_token_bytes

    args = parse_args(argv)
    print_banner()
    ddp, rank, _, world_size, device = compute_init(args.device)
    dtype = autocast_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)

    def autocast_ctx():
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    train_set = task_mixture(args.tasks, "train")
    val_set = task_mixture(args.tasks, "test")
    start = load_phase_model("mid", "base", args.model_tag, device)
    model, tokenizer, model_tag, meta = start.model, start.tokenizer, start.model_tag, start.meta
    start_step = start.step
    checkpoint_dir = f"{get_base_dir().rstrip('/')}/checkpoints/mid/{model_tag}"
    source_step = meta["source_step"] if start_step else meta["step"]
    token_bytes = get_token_bytes(device=device)
    config = model.config

    B, T = args.device_batch_size, args.max_seq_len or config.sequence_len
    tokens_per_fwdbwd = B * T * world_size
    if args.total_batch_size % tokens_per_fwdbwd:
        raise VibechatError(f"--total-batch-size {args.total_batch_size} is not a multiple of device batch x seq len x "
                            f"ranks = {tokens_per_fwdbwd}: change one of them")
    grad_accum_steps = args.total_batch_size // tokens_per_fwdbwd
    num_iterations = args.num_iterations
    if num_iterations <= 0:
        num_iterations = estimate_iterations(train_set, tokenizer, args.total_batch_size)
    print0(f"midtraining {model_tag} (base step {source_step}) on {train_set.name}, {len(train_set):,} conversations: "
           f"{num_iterations} steps of {args.total_batch_size:,} tokens (grad accumulation {grad_accum_steps})")

    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"] = group["lr"] * args.init_lr_frac
    loader_state = restore_training_state(optimizers, start.optim_data)
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model

    last_state = {"value": loader_state}

    def batches():
        for x, y, state in conversation_batches(train_set, tokenizer, B, T, rank, world_size, loader_state, device):
            last_state["value"] = state
            yield x, y

    train_batches = batches()
    metrics = MetricsLogger("mid")
    eval_steps = max(1, args.eval_tokens // tokens_per_fwdbwd)
    smooth_loss = meta.get("smooth_loss", 0.0) if start_step else 0.0
    val_bpb = meta.get("val_bpb") if start_step else None
    train_seconds = meta.get("train_seconds", 0.0) if start_step else 0.0

    def evaluate() -> float:
        model.eval()
        val_batches = ((x, y) for x, y, _ in conversation_batches(val_set, tokenizer, B, T, rank, world_size,
                                                                  device=device))
        with autocast_ctx():
            bpb = evaluate_bpb(model, val_batches, eval_steps, token_bytes)
        model.train()
        return bpb

    def checkpoint(step: int) -> None:
        meta_data = {"step": step, "model_config": config.__dict__, "user_config": vars(args),
                     "source_step": source_step, "num_iterations": num_iterations, "smooth_loss": smooth_loss,
                     "val_bpb": val_bpb, "train_seconds": train_seconds}
        save_checkpoint(checkpoint_dir, step, model.state_dict(), training_state(optimizers, last_state["value"]),
                        meta_data)
        print0(f"saved checkpoint step {step} to {checkpoint_dir}")

    step = start_step
    while True:
        last = step == num_iterations
        evaluating = val_set is not None and args.eval_every > 0 and (last or step % args.eval_every == 0)
        if evaluating and not (step == start_step and start_step):
            val_bpb = evaluate()
            print0(f"step {step}/{num_iterations} | val bpb {val_bpb:.4f}")
            metrics.log(step=step, val_bpb=val_bpb)
        if step != start_step and (last or (args.save_every > 0 and step % args.save_every == 0)):
            checkpoint(step)
        if last:
            break
        lr_mult = lr_multiplier(step, num_iterations, 0.0, args.warmdown_ratio, 0.0)
        set_schedules(optimizers, step, lr_mult)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        loss_value = train_step(train_model, optimizers, train_batches, grad_accum_steps, autocast_ctx).item()
        dt = time.time() - t0
        if step > start_step + 1:
            train_seconds += dt  # the first steps include compilation
        step += 1
        smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
        debiased = smooth_loss / (1 - 0.9 ** step)
        if not math.isfinite(loss_value):
            raise VibechatError(f"loss became {loss_value} at step {step}: lower the learning rates (--init-lr-frac)")
        if step % args.log_every == 0 or step == num_iterations:
            tok_per_sec = args.total_batch_size / dt
            print0(f"step {step}/{num_iterations} | loss {debiased:.4f} | lr {lr_mult:.3f} | dt {dt * 1000:.0f}ms | "
                   f"tok/s {tok_per_sec:,.0f}")
            metrics.log(step=step, loss=debiased, raw_loss=loss_value, lr=lr_mult, tok_per_sec=tok_per_sec, dt=dt)

    get_report().log(section="Midtraining", data=[
        vars(args),
        {"model": model_tag, "base step": source_step, "iterations": num_iterations,
         "tokens": num_iterations * args.total_batch_size, "conversations": len(train_set),
         "final val bpb": val_bpb, "train time (min)": round(train_seconds / 60, 2), "ranks": world_size},
    ])
    if ddp:
        dist.barrier()
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
