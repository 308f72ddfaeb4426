"""Pretraining phase: train a GPT from scratch on the store's shards.

    python -m jobs.base_train --depth=4                  # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 -m jobs.base_train       # one node, 8 GPUs

Resumes from the newest committed checkpoint of checkpoints/base/<model_tag>/ with the model,
every rank's optimizer state, the data loader's position and the RNG, so that a killed run
continues on exactly the loss curve of an uninterrupted one.
"""

import argparse
import time

import torch

from jobs.phase import (ResumableBatches, add_token_rows_args, add_training_args, check_loss, checkpoint_root, compiled,
                        end_phase, eval_bpb, eval_due, progress_line, restore_training_state, resume, save_due,
                        save_training_checkpoint, start_phase)
from jobs.training import (grad_accumulation, lr_multiplier, make_optimizers, peak_flops, set_schedules,
                           train_step)
from vibechat.common import VibechatError, positive_int, print0, run_main, steps_or_auto, synchronize
from vibechat.fp8 import enable_fp8
from vibechat.gpt import GPT, config_for_depth
from vibechat.metrics import MetricsLogger, system_metrics

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20, help="transformer layers; width = 64 x depth (default 20)")
    p.add_argument("--max-seq-len", type=positive_int, default=2048, help="context length in tokens")
    p.add_argument("--device-batch-size", type=positive_int, default=32, help="sequences per forward pass per rank")
    p.add_argument("--num-iterations", type=steps_or_auto, default=-1,
                   help="optimizer steps; -1 derives them from --target-param-data-ratio (Chinchilla)")
    p.add_argument("--target-param-data-ratio", type=float, default=20.0, help="training tokens per parameter")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear LR warm-up")
    p.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps of linear LR decay at the end")
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="LR at the end as a fraction of the peak")
    p.add_argument("--eval-every", type=int, default=250, help="steps between validation bpb evaluations")
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default d<depth>)")
    add_token_rows_args(p)
    p.add_argument("--fp8", action="store_true", help="the blocks' matmuls in FP8 (Hopper GPUs; needs torchao)")
    add_training_args(p, save_every=1000)
    return p.parse_args(argv)


def main(argv=None) -> None:
    from vibechat.dataloader import (prefetched, tokenizing_distributed_data_loader,
                                     tokenizing_distributed_data_loader_with_state)
    from vibechat.report import get_report
    from vibechat.tokenizer import get_token_bytes, get_tokenizer

    args = parse_args(argv)
    _, world_size, device, autocast_ctx = start_phase(args)

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
    config = config_for_depth(args.depth, tokenizer.get_vocab_size(), args.max_seq_len)
    model_tag = args.model_tag or f"d{args.depth}"
    checkpoint_dir = f"{checkpoint_root('base')}/{model_tag}"

    # batch arithmetic: tokens per optimizer step = device batch x seq x ranks x accumulation
    B, T = args.device_batch_size, args.max_seq_len
    tokens_per_fwdbwd = B * T * world_size
    grad_accum_steps = grad_accumulation(args.total_batch_size, tokens_per_fwdbwd)

    # resume from the newest committed checkpoint, if any
    resumed = resume(checkpoint_dir, device, world_size)
    if resumed:
        model, optim_data, meta = resumed
        if meta["model_config"] != config.__dict__:
            raise VibechatError(f"checkpoint {checkpoint_dir} step {meta['step']} is a {meta['model_config']} "
                                f"model but this run builds {config.__dict__}: use another --model-tag or depth")
        print0(f"resuming from step {meta['step']} of {checkpoint_dir}")
    else:
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device=device)
        model.init_weights()
        optim_data, meta = None, {}
    start_step = meta.get("step", 0)
    num_params = model.num_params()
    num_iterations = args.num_iterations
    if num_iterations <= 0:
        num_iterations = max(1, round(args.target_param_data_ratio * num_params / args.total_batch_size))
    num_flops_per_token = model.estimate_flops()
    print0(f"model d{args.depth}: {num_params:,} parameters, {num_flops_per_token:.3e} FLOPs/token, "
           f"{num_iterations} steps of {args.total_batch_size:,} tokens (grad accumulation {grad_accum_steps})")

    if args.fp8:
        enable_fp8(model)
    optimizers = make_optimizers(model, args)
    loader_state = restore_training_state(optimizers, optim_data)
    train_model = compiled(model, args.compile, device)
    train_batches = ResumableBatches(prefetched(tokenizing_distributed_data_loader_with_state(
        B, T, "train", device=device, resume_state=loader_state)), loader_state)
    metrics = MetricsLogger("base", resume_step=start_step)
    eval_steps = max(1, args.eval_tokens // tokens_per_fwdbwd)
    peak = peak_flops(device)
    smooth_loss = meta.get("smooth_loss", 0.0)
    val_bpb = meta.get("val_bpb")
    train_seconds = meta.get("train_seconds", 0.0)

    step = start_step
    while True:
        last = step == num_iterations
        if eval_due(step, args.eval_every, start_step, num_iterations):
            val_batches = tokenizing_distributed_data_loader(B, T, "val", device=device)
            val_bpb = eval_bpb(model, val_batches, eval_steps, token_bytes, autocast_ctx)
            record = dict(val_bpb=val_bpb, tokens=step * args.total_batch_size)
            print0(progress_line(step, num_iterations, record))
            metrics.log(step=step, **record)
        if save_due(step, args.save_every, start_step, num_iterations):
            save_training_checkpoint(checkpoint_dir, step, model, optimizers, train_batches.state, args, world_size,
                                     num_iterations=num_iterations, smooth_loss=smooth_loss, val_bpb=val_bpb,
                                     train_seconds=train_seconds, device_batch_size=B, max_seq_len=T)
        if last:
            break
        lr_mult = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_schedules(optimizers, step, lr_mult)
        synchronize(device)
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
        check_loss(loss_value, step, "lower the learning rates or check the data")
        if step % args.log_every == 0 or step == num_iterations:
            tok_per_sec = args.total_batch_size / dt
            record = dict(loss=debiased, raw_loss=loss_value, lr=lr_mult, dt=dt, tok_per_sec=tok_per_sec,
                          tokens=step * args.total_batch_size)
            if peak:
                record["mfu"] = num_flops_per_token * tok_per_sec / (peak * world_size)
            print0(progress_line(step, num_iterations, record) + f" | eta {(num_iterations - step) * dt / 60:.1f}m")
            metrics.log(step=step, **record, **system_metrics(device))

    get_report().log(section="Base model training", data=[
        vars(args),
        {"parameters": num_params, "flops_per_token": f"{num_flops_per_token:e}", "iterations": num_iterations,
         "tokens": num_iterations * args.total_batch_size, "final val bpb": val_bpb,
         "train time (min)": round(train_seconds / 60, 2), "ranks": world_size},
    ])
    end_phase()


if __name__ == "__main__":
    run_main(main)
