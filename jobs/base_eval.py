"""Base model evaluation phase: the CORE metric, bits per byte on the train and val splits, and a few samples.

    python -m jobs.base_eval                                # CORE from DCLM's eval bundle (downloaded once)
    python -m jobs.base_eval --core standin                 # offline: the generated stand-in CORE tasks
    torchrun --nproc_per_node=8 -m jobs.base_eval           # ranks split the CORE examples and the bpb batches

The stand-in tasks are recorded under their own names and their mean as "CORE (stand-in)", never as "CORE".
Scores go to metrics/<source>_eval.jsonl, one {"task", "score", ...} record each (an accuracy for a CORE task,
the mean centered accuracy for CORE, bits per byte for the splits), and to the report sections
"Base model evaluation" (CORE) and "Base model loss" (bpb and samples), "MID model ..." for --source mid.
"""

import argparse

from jobs.phase import add_device_args, end_phase, load_eval_model, start_phase
from vibechat.common import VibechatError, get_store_url, positive_int, print0, run_main
from vibechat.core_eval import (EVAL_BUNDLE_URL, CoreTask, core_score, evaluate_core, load_eval_bundle,
                                standin_core_tasks)
from vibechat.engine import Engine
from vibechat.metrics import MetricsLogger
from vibechat.storage import open_store

# greedy continuations of these show what the model knows; a base model should finish them sensibly
SAMPLE_PROMPTS = [
    "The capital of Italy is",
    "Water is made of hydrogen and",
    "The day after Monday is",
    "Two plus three equals",
    "The largest planet in the solar system is",
    "A word that means the opposite of happy is",
    "def add(a, b):\n    return",
    "The first four prime numbers are",
]
SAMPLE_TOKENS = 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["base", "mid", "sft", "rl"], default="base", help="the model to evaluate")
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default: the source's largest model)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    p.add_argument("--core", choices=["real", "standin"], default="real",
                   help="real: DCLM's eval bundle, from the store or downloaded into it; standin: generated "
                        "offline tasks of the same shapes, reported as stand-ins")
    p.add_argument("--eval-bundle-url", default=EVAL_BUNDLE_URL, help="where to download the eval bundle (a mirror)")
    p.add_argument("--max-per-task", type=int, default=-1,
                   help="evaluate a fixed sample of this many examples of each CORE task (-1: all)")
    p.add_argument("--bpb-tokens", type=int, default=20 * 524288, help="tokens per split for bits per byte")
    p.add_argument("--device-batch-size", type=positive_int, default=32,
                   help="sequences per forward pass for bits per byte")
    p.add_argument("--samples", type=int, default=len(SAMPLE_PROMPTS),
                   help=f"how many of the {len(SAMPLE_PROMPTS)} fixed prompts to continue greedily (0: none)")
    add_device_args(p)
    args = p.parse_args(argv)
    if args.max_per_task == 0 or args.max_per_task < -1:
        raise VibechatError(f"--max-per-task {args.max_per_task}: use a positive number of examples, or -1 for all")
    for name in ("bpb_tokens", "device_batch_size"):
        if getattr(args, name) < 1:
            raise VibechatError(f"--{name.replace('_', '-')} {getattr(args, name)}: use a positive number")
    if not 0 <= args.samples <= len(SAMPLE_PROMPTS):
        raise VibechatError(f"--samples {args.samples}: there are {len(SAMPLE_PROMPTS)} sample prompts; use 0 to "
                            f"{len(SAMPLE_PROMPTS)}")
    return args


def core_tasks(which: str, url: str) -> tuple[list[CoreTask], str]:
    """(tasks, the name of their mean): the eval bundle's as "CORE", or the stand-ins as "CORE (stand-in)"."""
    if which == "standin":
        return standin_core_tasks(), "CORE (stand-in)"
    try:
        return load_eval_bundle(open_store(get_store_url()), url), "CORE"
    except VibechatError as e:
        raise VibechatError(f"{e} (to evaluate offline, run with --core standin)") from None


def greedy_samples(model, tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt followed by its greedy continuation."""
    engine = Engine(model, tokenizer)
    samples = []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        results, _ = engine.generate_batch(tokens, max_tokens=SAMPLE_TOKENS, temperature=0.0)
        samples.append(tokenizer.decode(results[0][1:]))  # without the BOS
    return samples


def main(argv=None) -> None:
    from vibechat.dataloader import tokenizing_distributed_data_loader
    from vibechat.loss_eval import evaluate_bpb
    from vibechat.report import get_report
    from vibechat.tokenizer import get_token_bytes

    args = parse_args(argv)
    rank, world_size, device, autocast_ctx = start_phase(args)

    tasks, core_name = core_tasks(args.core, args.eval_bundle_url)  # before the model: a missing bundle fails fast
    model, tokenizer, meta, model_tag = load_eval_model(args.source, args.model_tag, args.step, device)
    print0(f"evaluating {args.source} model {model_tag} step {meta['step']} on {len(tasks)} {core_name} tasks")
    metrics = MetricsLogger(f"{args.source}_eval")
    common = {"model_tag": model_tag, "model_step": meta["step"]}

    with autocast_ctx():
        results = evaluate_core(model, tokenizer, device, tasks, args.max_per_task)
    core = core_score(results)
    print0(f"step 1/3 | {core_name} {core:.4f}")
    for label, r in results.items():
        metrics.log(task=label, score=r["accuracy"], centered=r["centered"], **common)
    metrics.log(task=core_name, score=core, tasks=list(results), **common)

    B, T = args.device_batch_size, model.config.sequence_len
    steps = max(1, args.bpb_tokens // (B * T * world_size))
    token_bytes = get_token_bytes(device=device)
    bpb = {}
    for split in ("train", "val"):
        batches = tokenizing_distributed_data_loader(B, T, split, device=device)
        with autocast_ctx():
            bpb[split] = evaluate_bpb(model, batches, steps, token_bytes)
        metrics.log(task=f"{split} bpb", score=bpb[split], tokens=steps * B * T * world_size, **common)
    print0(f"step 2/3 | train bpb {bpb['train']:.4f} | val bpb {bpb['val']:.4f}")

    samples = []
    if rank == 0 and args.samples:
        with autocast_ctx():
            samples = greedy_samples(model, tokenizer, SAMPLE_PROMPTS[: args.samples])
        metrics.log(samples=samples, **common)
    print0("step 3/3 | samples\n" + "\n".join(f"  {s!r}" for s in samples))

    title = "Base model" if args.source == "base" else f"{args.source.upper()} model"
    report = get_report()
    report.log(section=f"{title} loss", data=[
        {"model": model_tag, "step": meta["step"], "train bpb": bpb["train"], "val bpb": bpb["val"],
         "tokens per split": steps * B * T * world_size},
        *(["Greedy samples:"] + [f"- `{s!r}`" for s in samples] if samples else []),
    ])
    report.log(section=f"{title} evaluation", data=[
        vars(args),
        {"model": model_tag, "step": meta["step"], core_name: core},
        "| Task | Accuracy | Centered |",
        "|---|---:|---:|",
        *(f"| {label} | {r['accuracy']:.4f} | {r['centered']:.4f} |" for label, r in results.items()),
    ])
    end_phase()


if __name__ == "__main__":
    run_main(main)
