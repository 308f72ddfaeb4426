"""What the phase programs share: their common options, autocast, the checkpoint a phase starts from or resumes,
the training state saved beside the model, when to evaluate and save, and the progress line."""

import argparse
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vibechat.checkpoint_manager import (build_model, find_largest_model, find_last_step, load_checkpoint, load_model,
                                         load_optimizer_state, prune_checkpoints, save_checkpoint)
from vibechat.common import (VibechatError, autocast_dtype, compute_cleanup, compute_init, get_base_dir,
                             get_dist_info, nonnegative_int, positive_int, print0, print_banner)
from vibechat.gpt import GPT
from vibechat.layout import checkpoint_dir, join
from vibechat.loss_eval import evaluate_bpb
from vibechat.tokenizer import RustBPETokenizer, get_tokenizer

# how a metric shows in a progress line, in the record's order; other metrics are only logged.
# The controller's console (jobs/console.py) folds the `step N/M`, `loss X` and `tok/s Y` of these lines into one.
LINE_FORMATS = {
    "loss": lambda v: f"loss {v:.4f}",
    "val_bpb": lambda v: f"val bpb {v:.4f}",
    "val_loss": lambda v: f"val loss {v:.4f}",
    "reward": lambda v: f"reward {v:.4f}",
    "answer_tokens": lambda v: f"answer tokens {v:.1f}",
    "lr": lambda v: f"lr {v:.3f}",
    "dt": lambda v: f"dt {v * 1000:.0f}ms",
    "tok_per_sec": lambda v: f"tok/s {v:,.0f}",
    "mfu": lambda v: f"mfu {100 * v:.1f}%",
}


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda | cpu | mps (default: autodetect)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="autocast dtype (auto: bf16 on GPUs that support it, else fp32)")


def add_training_args(p: argparse.ArgumentParser, save_every: int, init_lr_frac: float | None = None) -> None:
    """The options every training phase has: the optimizers' LRs (and --init-lr-frac where init_lr_frac gives its
    default), checkpoint and log cadence, device and dtype."""
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    if init_lr_frac is not None:
        p.add_argument("--init-lr-frac", type=float, default=init_lr_frac,
                       help="peak LR as a fraction of the LRs above")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--save-every", type=int, default=save_every, help="steps between checkpoints (and one at the end)")
    p.add_argument("--keep-last", type=nonnegative_int, default=2,
                   help="checkpoints kept, the newest ones (the last is the final step's); older ones are deleted "
                        "after each save; 0 keeps all (default 2: one to resume from and one to fall back to)")
    p.add_argument("--log-every", type=positive_int, default=1, help="steps between progress lines and metric records")
    add_device_args(p)


def add_token_rows_args(p: argparse.ArgumentParser) -> None:
    """The options of the phases that train on rows packed with tokens (base, mid): the tokens of an optimizer
    step, the validation tokens, torch.compile."""
    p.add_argument("--total-batch-size", type=positive_int, default=524288,
                   help="tokens per optimizer step over all ranks; grad accumulation makes up the difference")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per evaluation")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile (auto: on CUDA)")


def start_phase(args: argparse.Namespace) -> tuple[int, int, torch.device, Callable]:
    """How every phase program begins: the banner, the device and process group for --device, the autocast of
    --dtype. Returns (rank, world size, device, autocast context)."""
    print_banner()
    _, rank, _, world_size, device = compute_init(args.device)
    return rank, world_size, device, autocast_context(device, args.dtype)


def autocast_context(device: torch.device, dtype: str):
    """A callable that opens a fresh autocast context for --dtype; float32 leaves autocast off."""
    dtype = autocast_dtype(device) if dtype == "auto" else getattr(torch, dtype)
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)


def compiled(model: GPT, choice: str, device: torch.device):
    """The model under torch.compile for --compile on, or auto on CUDA; else the model itself."""
    if choice == "on" or (choice == "auto" and device.type == "cuda"):
        return torch.compile(model, dynamic=False)
    return model


def checkpoint_root(stage: str) -> str:
    """Where a stage's checkpoints live, one folder per model tag."""
    return join(get_base_dir(), checkpoint_dir(stage))


def largest_model_tag(stage: str) -> str | None:
    try:
        return find_largest_model(checkpoint_root(stage))
    except FileNotFoundError:
        return None


def resume(checkpoint_dir: str, device: torch.device, world_size: int) -> tuple[GPT, dict, dict] | None:
    """(model, this rank's training state, meta) of the newest committed checkpoint in checkpoint_dir; None if there
    is none. A checkpoint of another rank count is refused: each rank saved its own optimizer shard and data."""
    try:
        step = find_last_step(checkpoint_dir)
    except FileNotFoundError:
        return None
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device)
    saved_world_size = meta.get("world_size", world_size)
    if saved_world_size != world_size:
        raise VibechatError(f"checkpoint {checkpoint_dir} step {step} was written by {saved_world_size} ranks "
                            f"but this run has {world_size}: resume with {saved_world_size} ranks "
                            "(nnodes x nproc_per_node), or use another --model-tag")
    optim_data = load_optimizer_state(checkpoint_dir, step, device)
    return build_model(model_data, meta, device, "train"), optim_data, meta


@dataclass
class PhaseStart:
    """Where a post-training phase starts: its own newest checkpoint (resuming), else the source stage's newest."""

    model: GPT
    tokenizer: RustBPETokenizer
    model_tag: str
    checkpoint_dir: str  # where this phase saves
    step: int  # 0 when starting from the source
    source_step: int  # the source checkpoint's step
    optim_data: dict | None  # this rank's {"optimizers", "loader_state", "rng"} when resuming
    meta: dict  # the phase's own checkpoint's when resuming, else empty


def load_phase_model(stage: str, source: str, model_tag: str | None, device: torch.device,
                     world_size: int) -> PhaseStart:
    """The model a post-training phase trains; without a checkpoint to start from, load_model's error names the
    program to run first. The model tag defaults to the stage's largest model, else the source's."""
    model_tag = model_tag or largest_model_tag(stage) or largest_model_tag(source)
    checkpoint_dir = join(checkpoint_root(stage), model_tag)
    resumed = resume(checkpoint_dir, device, world_size) if model_tag else None
    if resumed:
        model, optim_data, meta = resumed
        print0(f"resuming from step {meta['step']} of {checkpoint_dir}")
        return PhaseStart(model, get_tokenizer(), model_tag, checkpoint_dir, meta["step"], meta["source_step"],
                          optim_data, meta)
    model, tokenizer, source_meta = load_model(source, device, "train", model_tag)
    return PhaseStart(model, tokenizer, model_tag, checkpoint_dir, 0, source_meta["step"], None, {})


def load_eval_model(source: str, model_tag: str | None, step: int | None, device: torch.device):
    """(model, tokenizer, meta, model_tag) of the checkpoint to evaluate, by default the source's largest model at
    its newest step; without one, load_model's error names the phase to run first."""
    model_tag = model_tag or largest_model_tag(source)
    model, tokenizer, meta = load_model(source, device, "eval", model_tag, step)
    return model, tokenizer, meta, model_tag


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


def save_training_checkpoint(checkpoint_dir: str, step: int, model: GPT, optimizers: list, loader_state,
                             args: argparse.Namespace, world_size: int, **meta) -> None:
    """Commit one step: the model, every rank's training state, and a meta of the run plus the phase's `meta`."""
    meta_data = {"step": step, "model_config": model.config.__dict__, "user_config": vars(args),
                 "world_size": world_size, **meta}
    save_checkpoint(checkpoint_dir, step, model.state_dict(), training_state(optimizers, loader_state), meta_data)
    print0(f"saved checkpoint step {step} to {checkpoint_dir}")
    if get_dist_info()[1] == 0:
        pruned = prune_checkpoints(checkpoint_dir, args.keep_last)
        if pruned:
            print0(f"deleted checkpoint step {', '.join(map(str, pruned))} (--keep-last {args.keep_last})")


class ResumableBatches:
    """(inputs, targets) from a loader of (inputs, targets, state), keeping the state after the last batch taken:
    the data position a checkpoint saves."""

    def __init__(self, loader, state):
        self.loader, self.state = loader, state

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, self.state = next(self.loader)
        return x, y


def eval_due(step: int, every: int, start_step: int, num_steps: int) -> bool:
    """Evaluate from step 0 every `every` steps and at the end; not at the step a run resumes from, evaluated
    before its checkpoint was saved."""
    return every > 0 and (step == num_steps or step % every == 0) and (step != start_step or start_step == 0)


def save_due(step: int, every: int, start_step: int, num_steps: int) -> bool:
    """Save every `every` steps and at the end; never the step just started from."""
    return step != start_step and (step == num_steps or (every > 0 and step % every == 0))


def eval_bpb(model: GPT, batches, steps: int, token_bytes: torch.Tensor, autocast_ctx) -> float:
    """Bits per byte of `steps` batches in eval mode; the model goes back to training mode after."""
    model.eval()
    with autocast_ctx():
        bpb = evaluate_bpb(model, batches, steps, token_bytes)
    model.train()
    return bpb


def check_loss(loss: float, step: int, advice: str) -> None:
    """A NaN or infinite loss ends the run with `advice` on what to change."""
    if not math.isfinite(loss):
        raise VibechatError(f"loss became {loss} at step {step}: {advice}")


def progress_line(step: int, num_steps: int, record: dict) -> str:
    """`step 12/100 | loss 3.2100 | lr 1.000 | dt 250ms`: the record's metrics that LINE_FORMATS shows."""
    fields = [LINE_FORMATS[key](value) for key, value in record.items() if key in LINE_FORMATS]
    return " | ".join([f"step {step}/{num_steps}", *fields])


def end_phase() -> None:
    """Wait for every rank to finish (rank 0 writes the report), then leave the process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    compute_cleanup()
