"""Serving throughput and latency: the ContinuousBatcher with N concurrent streams against the same requests
served one at a time by the Engine (nanochat's server: one request per GPU at a time, through its engine).

    python -m jobs.bench_serve --depth 20 --out bench_serve.json                  # one GPU, bf16
    python -m jobs.bench_serve --depth 2 --device cpu --clients 1 4 --prompt-tokens 16 --new-tokens 8   # a smoke run

Random weights (jobs.bench_decode's model: no stop token is ever sampled, so every stream runs exactly
--new-tokens), random --prompt-tokens prompts, temperature 0.8 and top_k 50, a seed per stream. The streams
are the batcher's own callbacks in this process, all submitted at once: what is timed is the scheduler and
the GPU, not HTTP. Per level: aggregate tokens/s (all tokens over the time from the submission to the last
token), time to first token and inter-token latency (p50, p99 over the streams' tokens); then the same
requests one after another through the Engine, the fastest single stream this project has (its compiled
batch-1 step), as the baseline. "step alone" is the batcher's decode step replayed back to back with every row
free (at position 0, so attention reads one slot a row): the gap to a level's inter-token latency is the host's
and the prefills' share, and the attention over the streams' prefixes. First the check: the greedy tokens of
--check-streams prompts, each alone and then all at once, and every batched one the argmax, up to rounding,
of a full forward pass over the same sequence.
"""

import argparse
import json
import statistics
import time

import torch

from jobs.bench_decode import (ARGMAX_TOLERANCE, NoStopTokenizer, add_model_arguments, largest_argmax_shortfall,
                               parse_model_arguments, random_model)
from vibechat.common import VibechatError, autocast_dtype, compute_init, positive_int, run_main, synchronize
from vibechat.engine import ContinuousBatcher, Engine, Sequence


class Stream:
    """One client: its request and the time each of its tokens arrived."""

    def __init__(self, prompt: list[int], new_tokens: int, temperature: float, seed: int):
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.finish: str | None = None
        self.sequence = Sequence(prompt, new_tokens, self._token, self._finish, temperature=temperature, top_k=50,
                                 seed=seed)

    def _token(self, token: int, mask: int) -> None:
        self.times.append(time.perf_counter())
        self.tokens.append(token)

    def _finish(self, reason: str) -> None:
        self.finish = reason


def serve(batcher: ContinuousBatcher, streams: list[Stream]) -> float:
    """Submit every stream at once and step until all are done; the seconds from submission to the last token."""
    start = time.perf_counter()
    for stream in streams:
        batcher.submit(stream.sequence)
    while batcher.step():
        pass
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def one_at_a_time(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for the Engine to serve the requests one after another, each at a stream's settings."""
    start = time.perf_counter()
    for seed, prompt in enumerate(prompts):
        for _ in engine.generate(prompt, max_tokens=new_tokens, temperature=0.8, top_k=50, seed=seed):
            pass
    return time.perf_counter() - start


def step_alone_ms(batcher: ContinuousBatcher, steps: int = 50) -> float:
    """The batcher's decode step replayed back to back, ms a step, as it stands: after the levels every row is
    free, so from the first replay on at position 0 (one slot of attention a row). Tokens and positions are put
    back after."""
    step, saved = batcher._decode_step(), (batcher.tokens.clone(), batcher.pos.clone())
    synchronize(batcher.device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(batcher.device)
    elapsed = time.perf_counter() - start
    batcher.tokens.copy_(saved[0])
    batcher.pos.copy_(saved[1])
    return 1000 * elapsed / steps


def level(batcher: ContinuousBatcher, engine: Engine | None, prompts: list[list[int]], new_tokens: int) -> dict:
    """One concurrency level: all streams at once, then (with an engine) the same requests one at a time."""
    streams = [Stream(p, new_tokens, 0.8, seed) for seed, p in enumerate(prompts)]
    start = time.perf_counter()
    seconds = serve(batcher, streams)
    ttft = [1000 * (s.times[0] - start) for s in streams]
    itl = [1000 * (b - a) for s in streams for a, b in zip(s.times, s.times[1:])]
    tokens = sum(len(s.tokens) for s in streams)
    if tokens != len(prompts) * new_tokens:
        raise VibechatError(f"{tokens} tokens came back, not {len(prompts)} x {new_tokens}: a stream ended early")
    row = {"clients": len(prompts), "tokens_per_s": tokens / seconds,
           "seconds": seconds, "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
           "itl_ms_p50": percentile(itl, 50), "itl_ms_p99": percentile(itl, 99)}
    if engine is not None:
        row["one_at_a_time_tokens_per_s"] = tokens / one_at_a_time(engine, prompts, new_tokens)
        row["speedup"] = row["tokens_per_s"] / row["one_at_a_time_tokens_per_s"]
    return row


def print_row(row: dict) -> None:
    print(f"{row['clients']:>7} {row['tokens_per_s']:>9,.0f} {row['one_at_a_time_tokens_per_s']:>11,.0f} "
          f"{row['speedup']:>5.1f}x {row['ttft_ms_p50']:>9.1f} {row['ttft_ms_p99']:>7.1f} {row['itl_ms_p50']:>8.2f} "
          f"{row['itl_ms_p99']:>7.2f}")


def check_greedy_alone_equals_batched(batcher: ContinuousBatcher, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy tokens of each prompt alone, then of all at once: how many streams match, and where the first
    mismatch is (the step has one shape and a prefill's width is fixed by the prompt length, so a mismatch means
    a row's arithmetic depends on the other rows: in bf16 a rounding difference flips a near tie)."""
    alone = []
    for prompt in prompts:
        stream = Stream(prompt, new_tokens, 0.0, 0)
        serve(batcher, [stream])
        alone.append(stream.tokens)
    together = [Stream(p, new_tokens, 0.0, 0) for p in prompts]
    serve(batcher, together)
    mismatches = [next(i for i, (a, b) in enumerate(zip(x, s.tokens)) if a != b)
                  for x, s in zip(alone, together) if x != s.tokens]
    shortfall = largest_argmax_shortfall(batcher.model, [p + s.tokens for p, s in zip(prompts, together)],
                                         len(prompts[0]))
    if shortfall > ARGMAX_TOLERANCE:
        raise VibechatError(f"a batched greedy token is {shortfall:.3f} below the argmax logit of a full forward "
                            "pass: the batched decode is wrong")
    return {"streams": len(prompts), "identical": len(prompts) - len(mismatches),
            "first_mismatch_at": min(mismatches) if mismatches else None, "argmax_shortfall": shortfall}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--clients", type=positive_int, nargs="+", default=[1, 8, 32, 64],
                        help="concurrent streams, one level each (default: 1 8 32 64)")
    parser.add_argument("--check-streams", type=positive_int, default=32,
                        help="streams in the greedy alone-vs-batched check (default: 32)")
    args = parse_model_arguments(parser)
    _, _, _, _, device = compute_init(args.device)
    dtype = autocast_dtype(device)
    model = random_model(args.depth, args.vocab_size, args.sequence_len, device).to(dtype=dtype)
    max_batch = max(args.clients + [args.check_streams])
    batcher = ContinuousBatcher(model, NoStopTokenizer(args.vocab_size), max_batch=max_batch)
    start = time.perf_counter()
    batcher.warmup()
    print(f"warm-up (compile and capture of the {max_batch}-row decode step): {time.perf_counter() - start:.1f} s")

    g = torch.Generator().manual_seed(0)

    def prompts(count: int) -> list[list[int]]:
        return torch.randint(0, args.vocab_size, (count, args.prompt_tokens), generator=g).tolist()

    check = check_greedy_alone_equals_batched(batcher, prompts(args.check_streams), args.new_tokens)
    print(f"check: batched greedy tokens within {check['argmax_shortfall']:.3f} of the full forward's argmax; "
          f"{check['identical']} of {check['streams']} greedy streams identical alone and batched"
          + ("" if check["first_mismatch_at"] is None else f" (first mismatch at token {check['first_mismatch_at']})"))
    engine = Engine(model, NoStopTokenizer(args.vocab_size))
    # untimed: the Engine's prefill and step at the timed lengths (the batcher's ran in the check)
    level(batcher, engine, prompts(1), args.new_tokens)
    step_ms = step_alone_ms(batcher)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nd{args.depth}, {model.num_params() / 1e6:.0f}M parameters, {dtype}, {name}, torch {torch.__version__}; "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens a stream")
    print(f"step alone: {step_ms:.2f} ms for all {max_batch} rows")
    print(f"{'clients':>7} {'tok/s':>9} {'1-at-a-time':>11} {'ratio':>6} {'TTFT p50':>9} "
          f"{'p99':>7} {'ITL p50':>8} {'p99':>7}  (ms)")
    rows = []
    for clients in args.clients:
        rows.append(level(batcher, engine, prompts(clients), args.new_tokens))
        print_row(rows[-1])
    if args.out:
        result = {"device": name, "torch": torch.__version__, "dtype": str(dtype), "depth": args.depth,
                  "params": model.num_params(), "vocab_size": args.vocab_size, "prompt_tokens": args.prompt_tokens,
                  "new_tokens": args.new_tokens, "greedy_check": check, "step_alone_ms": step_ms, "results": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    run_main(main)
