"""Shared plumbing: where artifacts live, which device to use, distributed setup, logging.

torch is imported inside the functions that need it: the controller, the store and the dashboard use
this module too, and should start in a fraction of a second rather than load torch.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys

logger = logging.getLogger("vibechat")

DEFAULT_HOME = os.path.join(os.path.expanduser("~"), ".cache", "vibechat")


class VibechatError(Exception):
    """An error whose message tells the user what is wrong and what to do; printed without a traceback."""


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(float(text))  # 2e9 is fine
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text} must be at least {minimum}")
    return value


def positive_int(text: str) -> int:
    """argparse type of a count: an integer of at least 1; else a one-line usage error."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type of a count that may be 0 (warm-up steps, say); else a one-line usage error."""
    return _int_at_least(text, 0)


AUTO_STEPS = -1  # --num-iterations: derive the step count from the data (or epochs)


def steps_or_auto(text: str) -> int:
    """argparse type of --num-iterations: at least 1 step, or AUTO_STEPS; 0 and other negatives are errors."""
    value = _int_at_least(text, -2 ** 63)
    if value < 1 and value != AUTO_STEPS:
        raise argparse.ArgumentTypeError(f"{text} is not a number of steps: give at least 1, or {AUTO_STEPS} to "
                                         "derive the count")
    return value


def output_file(text: str) -> str:
    """argparse type of a file a program writes at its end: its folder must exist now, not after the work."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text}: folder {folder} does not exist")
    return text


def format_duration(seconds: float) -> str:
    """3m05s, or 1h02m03s from an hour on."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def get_store_url() -> str:
    """The store root: $VIBECHAT_STORE (file:// or s3:// URL or a plain path), else ~/.cache/vibechat."""
    return os.environ.get("VIBECHAT_STORE") or DEFAULT_HOME


def get_base_dir() -> str:
    """Where this process reads and writes artifacts.

    $VIBECHAT_BASE_DIR wins; else with $VIBECHAT_RUN set it is <store>/runs/<run>; else ~/.cache/vibechat.
    The result may be a local path or an s3:// URL: open it with vibechat.storage.open_store.
    """
    if os.environ.get("VIBECHAT_BASE_DIR"):
        return os.environ["VIBECHAT_BASE_DIR"]
    run = os.environ.get("VIBECHAT_RUN")
    if run:
        from vibechat.layout import join, run_dir

        return join(get_store_url(), run_dir(run))
    return DEFAULT_HOME


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def print_banner() -> None:
    print0(r"""
        _ _                _           _
 __   _(_) |__   ___  ___| |__   __ _| |_
 \ \ / / | '_ \ / _ \/ __| '_ \ / _` | __|
  \ V /| | |_) |  __/ (__| | | | (_| | |_
   \_/ |_|_.__/ \___|\___|_| |_|\__,_|\__|
""")


def is_ddp() -> bool:
    return int(os.environ.get("RANK", -1)) != -1


def get_dist_info() -> tuple[bool, int, int, int]:
    """(ddp, rank, local_rank, world_size) from the variables torchrun sets."""
    if is_ddp():
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def autodetect_device_type() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def compute_init(device_type: str | None = None) -> tuple[bool, int, int, int, torch.device]:
    """Seed, pick the device, and join the process group when launched by torchrun (NCCL on CUDA, gloo otherwise)."""
    import torch
    import torch.distributed as dist

    device_type = device_type or os.environ.get("VIBECHAT_DEVICE") or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise VibechatError("device 'cuda' was asked for but no CUDA GPU is visible: use --device cpu")
    torch.manual_seed(42)
    if device_type == "cuda":
        torch.cuda.manual_seed(42)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ddp, rank, local_rank, world_size = get_dist_info()
    if ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif ddp:
        device = torch.device(device_type)
        dist.init_process_group(backend="gloo")
    else:
        device = torch.device(device_type)
    if rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    return ddp, rank, local_rank, world_size, device


def compute_cleanup() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device, before reading a clock; nothing to wait for elsewhere."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU supports it, fp32 elsewhere (CPU bf16 is slow and lossy for tiny tests)."""
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class DummyWandb:
    """Stands in for a wandb run when logging to wandb is off."""

    def log(self, *args, **kwargs) -> None:
        pass

    def finish(self) -> None:
        pass


def run_main(main) -> None:
    """Run a program's main(); a VibechatError becomes one line on stderr and exit code 2. Output into a closed pipe
    (`| head -1`) ends the program quietly with the status of a SIGPIPE death, as other command-line tools do.
    A phase that a controller started renews its liveness record meanwhile (vibechat.liveness)."""
    from vibechat.liveness import heartbeat_from_env

    with heartbeat_from_env() or contextlib.nullcontext():
        _run_main(main)


def _run_main(main) -> None:
    try:
        main()
        sys.stdout.flush()  # here, not at exit: a closed pipe is caught below
    except VibechatError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        compute_cleanup()
        sys.exit(2)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's own flush must not fail again
        sys.exit(128 + signal.SIGPIPE)


def reduce_scatter_mean(out: torch.Tensor, stacked: torch.Tensor) -> None:
    """out = this rank's block of the mean over ranks of `stacked` (blocks along dim 0).

    NCCL does it in one reduce-scatter; gloo has none, so it all-reduces and keeps its block.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    if dist.get_backend() == "nccl":
        dist.reduce_scatter_tensor(out, stacked, op=dist.ReduceOp.AVG)
        return
    total = stacked.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    out.copy_(total.chunk(world)[dist.get_rank()] / world)


def all_gather_blocks(out: torch.Tensor, block: torch.Tensor) -> None:
    """out (world blocks along dim 0) = every rank's `block`, in rank order."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.all_gather_into_tensor(out, block)
        return
    dist.all_gather(list(out.chunk(dist.get_world_size())), block.contiguous())
