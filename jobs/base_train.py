"""Pretraining phase: train a GPT from scratch on the store's shards.

    python -m jobs.base_train --depth=4                  # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 -m jobs.base_train       # one node, 8 GPUs

Resumes from the newest committed checkpoint of checkpoints/base/<model_tag>/ with the model,
every rank's optimizer state, the data loader's position and the RNG, so that a killed run
continues on exactly the loss curve of an uninterrupted one.
"""

import argparse
import math
import time

import torch
import torch.distributed as dist

from vibechat.checkpoint_manager import (build_model, find_last_step, load_checkpoint, load_optimizer_state,
                                         save_checkpoint)
from vibechat.common import (VibechatError, autocast_dtype, compute_cleanup, compute_init, get_base_dir, print0,
                             print_banner, run_main)
from vibechat.gpt import GPT, config_for_depth
from vibechat.metrics import MetricsLogger

H100_BF16_PEAK_FLOPS = 989e12


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20, help="transformer layers; width = 64 x depth (default 20)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens")
    p.add_argument("--device-batch-size", type=int, default=32, help="sequences per forward pass per rank")
    p.add_argument("--total-batch-size", type=int, default=524288,
                   help="tokens per optimizer step over all ranks; grad accumulation makes up the difference")
    p.add_argument("--num-iterations", type=int, default=-1,
                   help="optimizer steps; -1 derives them from --target-param-data-ratio (Chinchilla)")
    p.add_argument("--target-param-data-ratio", type=float, default=20.0, help="training tokens per parameter")
    p.add_argument("--embedding-lr", type=float, default=0.2)
    p.add_argument("--unembedding-lr", type=float, default=0.004)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear LR warm-up")
    p.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps of linear LR decay at the end")
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="LR at the end as a fraction of the peak")
    p.add_argument("--eval-every", type=int, default=250, help="steps between validation bpb evaluations")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288, help="validation tokens per evaluation")
    p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints (and one at the end)")
    p.add_argument("--log-every", type=int, default=1, help="steps between progress lines and metric records")
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default d<depth>)")
    p.add_argument("--device", default=None, help="cuda | cpu | mps (default: autodetect)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="torch.compile (auto: on CUDA)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="autocast dtype (auto: bf16 on GPUs that support it, else fp32)")
    return p.parse_args(argv)


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float,
                  final_lr_frac: float) -> float:
    """Linear warm-up, constant, then linear warm-down to final_lr_frac."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int) -> float:
    """Muon momentum ramps 0.85 -> 0.95 over the first 300 steps."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def set_schedules(optimizers, step: int, lr_mult: float) -> None:
    adamw, muon = optimizers
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
    for group in muon.param_groups:
        group["momentum"] = muon_momentum(step)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the card, for MFU; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return H100_BF16_PEAK_FLOPS if ("H100" in name or "H200" in name) else None


def train_step(model, optimizers, batches, grad_accum_steps: int, autocast_ctx) -> torch.Tensor:
    """One optimizer step over grad_accum_steps micro-batches; returns the mean loss (a tensor, no host sync)."""
    total = None
    for _ in range(grad_accum_steps):
        x, y = next(batches)
        with autocast_ctx():
            loss = model(x, y)
        total = loss.detach() if total is None else total + loss.detach()
        (loss / grad_accum_steps).backward()
    for opt in optimizers:
        opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    return total / grad_accum_steps


def main(argv=None) -> None:
    from vibechat.dataloader import tokenizing_distributed_data_loader, tokenizing_distributed_data_loader_with_state
    from vibechat.loss_eval import evaluate_bpb
    from vibechat.report import get_report
    from vibechat.tokenizer import get_token_bytes, get_tokenizer

    args = parse_args(argv)
    print_banner()
    ddp, rank, _, world_size, device = compute_init(args.device)
    dtype = autocast_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)

    def autocast_ctx():
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
    config = config_for_depth(args.depth, tokenizer.get_vocab_size(), args.max_seq_len)
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = f"{get_base_dir()}/checkpoints/base/{model_tag}"

    # batch arithmetic: tokens per optimizer step = device batch x seq x ranks x accumulation
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len * world_size
    if args.total_batch_size % tokens_per_fwdbwd:
        raise VibechatError(f"--total-batch-size {args.total_batch_size} is not a multiple of device batch x seq len x "
                            f"ranks = {tokens_per_fwdbwd}: change one of them")
    grad_accum_steps = args.total_batch_size // tokens_per_fwdbwd

    # resume from the newest committed checkpoint, if any
    try:
        start_step = find_last_step(checkpoint_dir)
    except FileNotFoundError:
        start_step = 0
    loader_state, meta = None, {}
    if start_step:
        model_data, _, meta = load_checkpoint(checkpoint_dir, start_step, device)
        if meta.get("model_config") != config.__dict__:
            raise VibechatError(f"checkpoint {checkpoint_dir} step {start_step} is a {meta.get('model_config')} "
                                f"model but this run builds {config.__dict__}: use another --model-tag or depth")
        if meta.get("world_size", world_size) != world_size:
            raise VibechatError(f"checkpoint {checkpoint_dir} step {start_step} was written by {meta['world_size']} ranks "
                                f"but this run has {world_size}: resume with {meta['world_size']} ranks "
                                "(nnodes x nproc_per_node), or use another --model-tag")
        optim_data = load_optimizer_state(checkpoint_dir, start_step, device)
        model = build_model(model_data, meta, device, "train")
        print0(f"resuming from step {start_step} of {checkpoint_dir}")
    else:
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device=device)
        model.init_weights()
    num_params = model.num_params()
    num_iterations = args.num_iterations
    if num_iterations <= 0:
        num_iterations = max(1, round(args.target_param_data_ratio * num_params / args.total_batch_size))
    num_flops_per_token = model.estimate_flops()
    print0(f"model d{args.depth}: {num_params:,} parameters, {num_flops_per_token:.3e} FLOPs/token, "
           f"{num_iterations} steps of {args.total_batch_size:,} tokens (grad accumulation {grad_accum_steps})")

    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    if start_step:
        for opt, state in zip(optimizers, optim_data["optimizers"]):
            opt.load_state_dict(state)
        loader_state = optim_data["loader_state"]
        torch.set_rng_state(optim_data["rng"]["cpu"].cpu())  # map_location moved it to the device
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model

    loader = tokenizing_distributed_data_loader_with_state(args.device_batch_size, args.max_seq_len, "train",
                                                           device=device, resume_state=loader_state)
    last_state = {"value": loader_state}

    def batches():
        for x, y, state in loader:
            last_state["value"] = state
            yield x, y

    train_batches = batches()
    metrics = MetricsLogger("base")
    eval_steps = max(1, args.eval_tokens // (args.device_batch_size * args.max_seq_len * world_size))
    peak = peak_flops(device)
    smooth_loss = meta.get("smooth_loss", 0.0)
    val_bpb = meta.get("val_bpb")
    train_seconds = meta.get("train_seconds", 0.0)

    def evaluate() -> float:
        model.eval()
        val_loader = tokenizing_distributed_data_loader(args.device_batch_size, args.max_seq_len, "val", device=device)
        with autocast_ctx():
            bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
        model.train()
        return bpb

    def checkpoint(step: int) -> None:
        optim_data = {"optimizers": [opt.state_dict() for opt in optimizers], "loader_state": last_state["value"],
                      "rng": {"cpu": torch.get_rng_state()}}
        meta_data = {"step": step, "model_config": config.__dict__, "user_config": vars(args), "world_size": world_size,
                     "num_iterations": num_iterations, "smooth_loss": smooth_loss, "val_bpb": val_bpb,
                     "train_seconds": train_seconds, "device_batch_size": args.device_batch_size,
                     "max_seq_len": args.max_seq_len}
        save_checkpoint(checkpoint_dir, step, model.state_dict(), optim_data, meta_data)
        print0(f"saved checkpoint step {step} to {checkpoint_dir}")

    step = start_step
    while True:
        last = step == num_iterations
        if args.eval_every > 0 and (last or step % args.eval_every == 0) and not (step == start_step and start_step):
            val_bpb = evaluate()
            print0(f"step {step}/{num_iterations} | val bpb {val_bpb:.4f}")
            metrics.log(step=step, val_bpb=val_bpb, tokens=step * args.total_batch_size)
        if step != start_step and (last or (args.save_every > 0 and step % args.save_every == 0)):
            checkpoint(step)
        if last:
            break
        lr_mult = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_schedules(optimizers, step, lr_mult)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
        loss = train_step(train_model, optimizers, train_batches, grad_accum_steps, autocast_ctx)
        loss_value = loss.item()  # one host sync per step, for logging
        dt = time.time() - t0
        if step > start_step + 1:
            train_seconds += dt  # the first steps include compilation
        step += 1
        ema = 0.9
        smooth_loss = ema * smooth_loss + (1 - ema) * loss_value
        debiased = smooth_loss / (1 - ema ** step)
        if not math.isfinite(loss_value):
            raise VibechatError(f"loss became {loss_value} at step {step}: lower the learning rates or check the data")
        if step % args.log_every == 0 or step == num_iterations:
            tok_per_sec = args.total_batch_size / dt
            mfu = num_flops_per_token * tok_per_sec / (peak * world_size) if peak else None
            eta = (num_iterations - step) * dt
            line = (f"step {step}/{num_iterations} | loss {debiased:.4f} | lr {lr_mult:.3f} | "
                    f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f}")
            if mfu is not None:
                line += f" | mfu {100 * mfu:.1f}%"
            print0(line + f" | eta {eta / 60:.1f}m")
            record = dict(step=step, loss=debiased, raw_loss=loss_value, lr=lr_mult, tok_per_sec=tok_per_sec,
                          tokens=step * args.total_batch_size, dt=dt)
            if mfu is not None:
                record["mfu"] = mfu
            if device.type == "cuda":
                record["gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            metrics.log(**record)

    get_report().log(section="Base model training", data=[
        vars(args),
        {"parameters": num_params, "flops_per_token": f"{num_flops_per_token:e}", "iterations": num_iterations,
         "tokens": num_iterations * args.total_batch_size, "final val bpb": val_bpb,
         "train time (min)": round(train_seconds / 60, 2), "ranks": world_size},
    ])
    if ddp:
        dist.barrier()
    compute_cleanup()


if __name__ == "__main__":
    run_main(main)
