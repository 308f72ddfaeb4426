"""Decode speed: tokens/s of the Engine (KV cache; on CUDA a compiled step replayed as a CUDA graph) against
GPT.generate, which recomputes the whole sequence for every token.

    python -m jobs.bench_decode --depth 20 --out bench_decode.json            # one GPU, bf16
    python -m jobs.bench_decode --depth 2 --device cpu --new-tokens 16        # a smoke run, fp32

Random weights in every matrix (at init the blocks are the identity, and a cache bug could not change a
token), vocab 65536, a random prompt. First the checks: in fp32, where rounding cannot flip an argmax, the
Engine's greedy tokens must equal GPT.generate's; in the timed dtype, every greedy token of the largest batch
must be the argmax, up to rounding, of a full forward pass over the same sequence. Then each method is timed
from the prompt to the last token, median of --runs after one untimed run (which compiles and captures);
"step alone" is the Engine's decode step replayed back to back, so the gap to ms/token is the host's share.
--profile then records one batch-1 request as timed (on CUDA through the captured graphs) and writes where its
time goes: its wall, the kernels' busy time within it, the top kernels and the top host calls.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn

from vibechat.common import (VibechatError, autocast_dtype, compute_init, output_file, positive_int, run_main,
                             synchronize)
from vibechat.engine import Engine
from vibechat.gpt import GPT, config_for_depth
from vibechat.tokenizer import SPECIAL_TOKENS

ARGMAX_TOLERANCE = 0.5  # logits; bf16 rounding moves them by a few hundredths, a wrong token is units below


class NoStopTokenizer:
    """The special tokens the Engine asks for, placed past the vocabulary: random weights never sample them,
    so no sample stops early or calls the calculator, and every run decodes exactly --new-tokens."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode_special(self, name: str) -> int:
        return self.vocab_size + SPECIAL_TOKENS.index(name)

    def get_bos_token_id(self) -> int:
        return self.encode_special("<|bos|>")


def random_model(depth: int, vocab_size: int, sequence_len: int, device: torch.device) -> GPT:
    with torch.device("meta"):
        model = GPT(config_for_depth(depth, vocab_size, sequence_len))
    model.to_empty(device=device)
    model.init_weights()  # fills the rotary tables
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=module.weight.size(1) ** -0.5)
    return model.eval()


def check_greedy_equals_generate(model: GPT, prompt: list[int], num_tokens: int) -> None:
    expected = list(model.generate(prompt, num_tokens, temperature=0.0))
    results, _ = Engine(model, NoStopTokenizer(model.config.vocab_size)).generate_batch(
        prompt, max_tokens=num_tokens, temperature=0.0)
    got = results[0][len(prompt):]
    if got != expected:
        first = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        raise VibechatError(f"Engine greedy output differs from GPT.generate at token {first}: "
                            f"{got[first:first + 5]} vs {expected[first:first + 5]}")
    print(f"check: Engine greedy == GPT.generate greedy for {num_tokens} tokens (fp32)")


@torch.inference_mode()
def largest_argmax_shortfall(model: GPT, results: list[list[int]], prompt_len: int) -> float:
    """Over every generated token: how far its logit is below the largest, in a full forward pass."""
    shortfall = 0.0
    for row in results:
        ids = torch.tensor([row], device=model.get_device())
        logits = model(ids)[0, prompt_len - 1:-1]
        chosen = logits.gather(1, ids[0, prompt_len:, None])[:, 0]
        shortfall = max(shortfall, (logits.max(dim=1).values - chosen).max().item())
    return shortfall


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The random model, the requests' sizes, the device and the output file: shared with jobs.bench_serve."""
    parser.add_argument("--depth", type=positive_int, default=20, help="model depth (default: 20)")
    parser.add_argument("--vocab-size", type=positive_int, default=65536, help="(default: 65536)")
    parser.add_argument("--sequence-len", type=positive_int, default=2048, help="model context (default: 2048)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=128, help="(default: 128)")
    parser.add_argument("--new-tokens", type=positive_int, default=256,
                        help="tokens generated per sample (default: 256)")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu"], help="(default: the best available)")
    parser.add_argument("--out", default=None, type=output_file, help="write the results as JSON here")


def parse_model_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    if args.prompt_tokens + args.new_tokens > args.sequence_len:
        raise VibechatError(f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} exceed "
                            f"--sequence-len {args.sequence_len}: lengthen the context or generate fewer tokens")
    return args


def timed(generate, runs: int, device: torch.device) -> list[float]:
    """Seconds per call of generate(), after one untimed call."""
    times = []
    for _ in range(runs + 1):
        synchronize(device)
        start = time.perf_counter()
        generate()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times[1:]


@torch.inference_mode()  # the decoder's buffers are inference tensors
def decode_step_ms(engine: Engine, batch_size: int, start: int, device: torch.device, steps: int = 100) -> float:
    """Milliseconds of the Engine's decode step alone, at batch_size, as its last generate built it: replayed
    back to back from position `start`, with no sampling on the host and no host sync in between. The rest of
    a token's time is what the host adds: sampling launches, reading the column, the stream's bookkeeping."""
    decoder = next(d for key, d in engine._decoders.items()
                   if key[0] == batch_size and key[-1] == engine.use_cuda_graph)
    steps = min(steps, decoder.cache.seq_len - start)  # every write stays inside the cache

    def replay() -> None:
        decoder.pos.fill_(start)
        for _ in range(steps):
            decoder.step()

    return 1000 * statistics.median(timed(replay, 3, device)) / steps


def profile_request(path: str, generate, device: torch.device) -> None:
    """Where one request's time goes, written to `path` and printed: under the profiler (which slows the host, so
    the wall here is above the timed one), the wall, the kernels' busy time, and the top kernels and host calls."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        generate()
        synchronize(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    lines = [f"one request at batch 1: {1000 * wall:.1f} ms wall under the profiler" + (
        f"; kernels busy {busy / 1000:.1f} ms, the rest is the GPU waiting on the host" if cuda else "")]
    for sort in (["self_device_time_total"] if cuda else []) + ["self_cpu_time_total"]:
        lines.append(events.table(sort_by=sort, row_limit=25, max_name_column_width=70))
    text = "\n".join(lines)
    print(text)
    with open(path, "w") as f:
        f.write(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch-sizes", type=positive_int, nargs="+", default=[1, 16], help="(default: 1 16)")
    parser.add_argument("--runs", type=positive_int, default=3,
                        help="timed runs per method; the median counts (default: 3)")
    parser.add_argument("--check-tokens", type=positive_int, default=16,
                        help="greedy tokens compared with GPT.generate (default: 16)")
    parser.add_argument("--profile", default=None, type=output_file,
                        help="after timing, write here where one batch-1 request's time goes")
    args = parse_model_arguments(parser)
    _, _, _, _, device = compute_init(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 check needs true fp32; bf16 timing is unaffected

    model = random_model(args.depth, args.vocab_size, args.sequence_len, device)
    prompt = torch.randint(0, args.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    check_greedy_equals_generate(model, prompt, args.check_tokens)

    dtype = autocast_dtype(device)
    model.to(dtype=dtype)
    engine = Engine(model, NoStopTokenizer(args.vocab_size))
    results, _ = engine.generate_batch(prompt, num_samples=max(args.batch_sizes), max_tokens=args.new_tokens,
                                       temperature=0.0)
    shortfall = largest_argmax_shortfall(model, results, len(prompt))
    if shortfall > ARGMAX_TOLERANCE:
        raise VibechatError(f"an Engine greedy token is {shortfall:.3f} below the argmax logit of a full forward "
                            f"pass ({dtype}): the cached decode is wrong")
    print(f"check: every greedy token at batch {max(args.batch_sizes)} is within {shortfall:.3f} of the full "
          f"forward's argmax logit ({dtype})")

    def naive_run() -> None:
        list(model.generate(prompt, args.new_tokens, top_k=50))

    def engine_run(batch_size: int) -> None:
        for _ in engine.generate(prompt, num_samples=batch_size, max_tokens=args.new_tokens, temperature=1.0,
                                 top_k=50):
            pass

    # (method, batch size, the Engine's use_cuda_graph, one run)
    methods = [("GPT.generate, full recompute", 1, False, naive_run)]
    methods += [("Engine, eager", b, False, lambda b=b: engine_run(b)) for b in args.batch_sizes]
    if engine.use_cuda_graph:
        methods += [("Engine, CUDA graph", b, True, lambda b=b: engine_run(b)) for b in args.batch_sizes]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nd{args.depth}, {model.num_params() / 1e6:.0f}M parameters, {dtype}, {name}, torch {torch.__version__}; "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, median of {args.runs}")
    print(f"{'method':<30} {'batch':>5} {'tok/s':>10} {'ms/token':>9} {'step alone':>11}")
    rows = []
    for method, batch_size, use_cuda_graph, generate in methods:
        engine.use_cuda_graph = use_cuda_graph
        seconds = timed(generate, args.runs, device)
        median = statistics.median(seconds)
        tokens_per_s = batch_size * args.new_tokens / median
        step_ms = None if method.startswith("GPT") else decode_step_ms(engine, batch_size, len(prompt), device)
        step = "" if step_ms is None else f"{step_ms:.2f} ms"
        print(f"{method:<30} {batch_size:>5} {tokens_per_s:>10,.0f} {1000 * median / args.new_tokens:>9.2f} {step:>11}")
        rows.append({"method": method, "batch_size": batch_size, "tokens_per_s": tokens_per_s, "seconds": seconds,
                     "decode_step_ms": step_ms})

    if args.profile:
        engine.use_cuda_graph = methods[-1][2]  # the last timed kind: the CUDA graph where there is one
        profile_request(args.profile, lambda: engine_run(1), device)
    if args.out:
        result = {"device": name, "torch": torch.__version__, "dtype": str(dtype), "depth": args.depth,
                  "params": model.num_params(), "vocab_size": args.vocab_size, "prompt_tokens": args.prompt_tokens,
                  "new_tokens": args.new_tokens, "runs": args.runs, "greedy_check_tokens": args.check_tokens,
                  "argmax_shortfall": shortfall, "results": rows}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    run_main(main)
