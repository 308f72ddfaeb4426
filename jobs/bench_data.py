"""Data-side throughput on this machine: tokenizer training (chars/s) and the pretraining loader (tokens/s),
on the offline pydocs corpus, built into a temporary store.

    python -m jobs.bench_data                      # CPU
    python -m jobs.bench_data --device cuda        # the loader's pinned-memory copy to the GPU included

One H100 training d20 consumes ~140K tokens/s; the loader of each rank must keep ahead of that.
"""

import argparse
import os
import tempfile
import time

import torch

from vibechat.common import positive_int, print0, run_main, synchronize
from vibechat.dataloader import tokenizing_distributed_data_loader
from vibechat.dataset import build_pydocs, parquets_iter_batched
from vibechat.storage import open_store
from vibechat.tokenizer import HuggingFaceTokenizer, RustBPETokenizer

H100_D20_TOKENS_PER_S = 140_000


def bench_training(texts: list[str], vocab_sizes: list[int]) -> tuple[list[tuple], RustBPETokenizer]:
    chars = sum(len(t) for t in texts)
    rows, tokenizer = [], None
    for cls in (RustBPETokenizer, HuggingFaceTokenizer):
        for vocab_size in vocab_sizes:
            t0 = time.perf_counter()
            trained = cls.train_from_iterator(texts, vocab_size)
            seconds = time.perf_counter() - t0
            rows.append((cls.__name__, vocab_size, chars, seconds, chars / seconds))
            if cls is RustBPETokenizer:
                tokenizer = trained  # the largest vocabulary, for the loader
    return rows, tokenizer


def bench_loader(tokenizer, B: int, T: int, threads: int, steps: int, device: str) -> float:
    loader = tokenizing_distributed_data_loader(B, T, "train", tokenizer_threads=threads, device=device,
                                                dataset="pydocs", tokenizer=tokenizer)
    next(loader)  # first shard read and the first buffer fill
    synchronize(torch.device(device))
    t0 = time.perf_counter()
    for _ in range(steps):
        inputs, _ = next(loader)
    synchronize(torch.device(device))
    return steps * inputs.numel() / (time.perf_counter() - t0)


def positive_ints(text: str) -> list[int]:
    """argparse type of a comma-separated list of counts: 4096,16384."""
    return [positive_int(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_data",
                                     description="Tokenizer training and data loader throughput on this machine.")
    parser.add_argument("--vocab-sizes", type=positive_ints, default="4096,16384",
                        help="comma-separated vocabulary sizes to train")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="B of the loader")
    parser.add_argument("--seq-len", type=positive_int, default=2048, help="T of the loader")
    parser.add_argument("--threads", type=positive_ints, default="1,2,4", help="comma-separated tokenizer_threads to try")
    parser.add_argument("--steps", type=positive_int, default=20, help="batches timed per loader setting")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the loader puts batches")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vibechat-bench-") as store_dir:
        os.environ["VIBECHAT_STORE"] = store_dir  # where the loader looks for shards
        run(args)


def run(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    build_pydocs(open_store(os.environ["VIBECHAT_STORE"]))
    texts = [t for batch in parquets_iter_batched("train", dataset="pydocs") for t in batch]
    print0(f"pydocs train split: {len(texts):,} documents, {sum(map(len, texts)):,} chars "
           f"(built in {time.perf_counter() - t0:.1f}s); {os.cpu_count()} CPU cores; torch {torch.__version__}")

    rows, tokenizer = bench_training(texts, args.vocab_sizes)
    print0("\n| trainer | vocab | chars | seconds | chars/s |\n|---|---:|---:|---:|---:|")
    for name, vocab, chars, seconds, rate in rows:
        print0(f"| {name} | {vocab} | {chars:,} | {seconds:.2f} | {rate / 1e6:.2f}M |")

    chars_per_token = sum(map(len, texts)) / sum(len(ids) for ids in tokenizer.encode(texts))
    print0(f"\nloader: B={args.batch_size} T={args.seq_len}, vocab {tokenizer.get_vocab_size()} "
           f"({chars_per_token:.2f} chars/token), device {args.device}")
    print0("| tokenizer_threads | tokens/s | vs one H100 at d20 (140K tokens/s) |\n|---:|---:|---:|")
    for threads in args.threads:
        rate = bench_loader(tokenizer, args.batch_size, args.seq_len, threads, args.steps, args.device)
        print0(f"| {threads} | {rate / 1e3:,.0f}K | {rate / H100_D20_TOKENS_PER_S:.1f}x |")


if __name__ == "__main__":
    run_main(main)
