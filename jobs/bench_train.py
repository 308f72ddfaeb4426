"""Training throughput benchmark: tokens/s and MFU of base training at a given depth and batch.

    python -m jobs.bench_train --depth 20 --device-batch-size 32          # on one GPU
    python -m jobs.bench_train --depth 20 --device-batch-size 32 --total-batch-size 524288 --fp8   # Hopper
    python -m jobs.bench_train --depth 2 --max-seq-len 128 --device-batch-size 4 --total-batch-size 512 --steps 3

Random tokens, the real model and optimizers and the same train_step as jobs.base_train.
The first --warmup steps (compilation) are not timed; the median step time is reported.
"""

import argparse
import contextlib
import json
import statistics
import time

import torch

from jobs.training import grad_accumulation, peak_flops, step_optimizers, train_step
from vibechat.common import autocast_dtype, compute_init, nonnegative_int, output_file, positive_int, run_main, synchronize
from vibechat.fp8 import enable_fp8
from vibechat.gpt import GPT, config_for_depth


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m jobs.bench_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--max-seq-len", type=positive_int, default=2048)
    p.add_argument("--device-batch-size", type=positive_int, default=32)
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per optimizer step (default: one micro-batch)")
    p.add_argument("--vocab-size", type=positive_int, default=65536)
    p.add_argument("--steps", type=positive_int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--compile", choices=["on", "off"], default="on")
    p.add_argument("--device", default=None)
    p.add_argument("--sdpa", choices=["default", "cudnn"], default="default",
                   help="attention kernel order: PyTorch's default, or cuDNN attention first")
    p.add_argument("--fp8", action="store_true", help="the blocks' matmuls in FP8 (Hopper GPUs; needs torchao)")
    p.add_argument("--out", default=None, type=output_file, help="write the result as JSON here")
    p.add_argument("--profile", default=None, type=output_file,
                   help="after timing, write here where the time goes: forward+backward vs optimizer, kernels by kind")
    args = p.parse_args(argv)

    _, _, _, world_size, device = compute_init(args.device)
    dtype = autocast_dtype(device)
    config = config_for_depth(args.depth, args.vocab_size, args.max_seq_len)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    if args.fp8:
        enable_fp8(model)
    optimizers = model.setup_optimizers()
    train_model = torch.compile(model, dynamic=False) if args.compile == "on" else model
    attention = contextlib.nullcontext()
    if args.sdpa == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        attention = sdpa_kernel(order, set_priority=True)
    with attention:
        run_benchmark(args, model, train_model, optimizers, world_size, device, dtype)


def run_benchmark(args, model, train_model, optimizers, world_size: int, device, dtype) -> None:
    micro_tokens = args.device_batch_size * args.max_seq_len * world_size
    total = args.total_batch_size if args.total_batch_size > 0 else micro_tokens
    grad_accum = grad_accumulation(total, micro_tokens)

    def random_batches():
        while True:
            x = torch.randint(0, args.vocab_size, (args.device_batch_size, args.max_seq_len + 1), device=device)
            yield x[:, :-1], x[:, 1:]

    def autocast_ctx():
        return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    batches = random_batches()
    times = []
    for i in range(args.warmup + args.steps):
        synchronize(device)
        t0 = time.perf_counter()
        loss = train_step(train_model, optimizers, batches, grad_accum, autocast_ctx)
        loss.item()
        synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tok_per_sec = total / dt
    flops_per_token = model.estimate_flops()
    peak = peak_flops(device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__, "depth": args.depth, "params": model.num_params(),
        "seq_len": args.max_seq_len, "device_batch_size": args.device_batch_size, "grad_accum": grad_accum,
        "tokens_per_step": total, "median_step_s": dt, "tok_per_sec": tok_per_sec,
        "flops_per_token": flops_per_token,
        "mfu": flops_per_token * tok_per_sec / (peak * world_size) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
        "compile": args.compile, "dtype": str(dtype), "fp8": args.fp8, "sdpa": args.sdpa,
    }
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] else "n/a"
    model_name = f"d{args.depth}{' fp8' if args.fp8 else ''}"
    print(f"{model_name} B={args.device_batch_size} T={args.max_seq_len} accum={grad_accum} on {result['device']}: "
          f"{tok_per_sec:,.0f} tok/s, MFU {mfu}, step {dt * 1000:.0f} ms, mem {result['peak_memory_gib']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    if args.profile:
        profile_split(args.profile, train_model, optimizers, batches, autocast_ctx, grad_accum, device)


# kernel name fragments -> where the time goes; checked in order, the first match wins
KERNEL_KINDS = [("attention", ("flash", "fmha", "cudnn", "attention")),
                ("matmul", ("gemm", "sm90_xmma", "nvjet", "cutlass", "cublas")),
                ("fused elementwise (Triton: inductor's norms and relu^2; train_ops' rotary + QK-norm, softcap + loss)",
                 ("triton", "_rotary_norm", "_softcap_ce"))]


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, fragments in KERNEL_KINDS if any(f in lowered for f in fragments)), "other")


def profile_split(path: str, train_model, optimizers, batches, autocast_ctx, grad_accum: int, device) -> None:
    """Where one optimizer step's time goes: micro-batch forward+backward vs optimizer step (synchronized wall
    times), and the forward+backward's device time by kernel kind (profiler). Written to `path`, also printed."""
    from torch.profiler import ProfilerActivity, profile

    def forward_backward():
        x, y = next(batches)
        with autocast_ctx():
            loss = train_model(x, y)
        (loss / grad_accum).backward()

    fb_times, opt_times = [], []
    for _ in range(3):
        synchronize(device)
        t0 = time.perf_counter()
        forward_backward()
        synchronize(device)
        t1 = time.perf_counter()
        step_optimizers(optimizers)
        synchronize(device)
        fb_times.append(t1 - t0)
        opt_times.append(time.perf_counter() - t1)
    fb, opt = statistics.median(fb_times), statistics.median(opt_times)
    step = grad_accum * fb + opt
    lines = [f"one optimizer step = {grad_accum} x forward+backward ({fb * 1000:.1f} ms) + optimizer step "
             f"({opt * 1000:.1f} ms): {100 * grad_accum * fb / step:.1f}% / {100 * opt / step:.1f}%"]

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        forward_backward()
        synchronize(device)
    by_kind: dict[str, float] = {}  # GPU kernels only: on the CPU there is no kernel to sort
    for event in prof.key_averages():
        if device.type == "cuda" and event.device_type == torch.autograd.DeviceType.CUDA:
            kind = kernel_kind(event.key)
            by_kind[kind] = by_kind.get(kind, 0.0) + event.self_device_time_total
    busy = sum(by_kind.values())
    lines.append(f"forward+backward device time by kernel kind (busy {busy / 1000:.1f} ms of {fb * 1000:.1f} ms wall):")
    for kind, us in sorted(by_kind.items(), key=lambda item: -item[1]):
        lines.append(f"  {kind:<70} {us / 1000:9.1f} ms  {100 * us / busy:5.1f}%")
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines.append(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=80))
    text = "\n".join(lines)
    print(text)
    with open(path, "w") as f:
        f.write(text + "\n")

if __name__ == "__main__":
    run_main(main)
