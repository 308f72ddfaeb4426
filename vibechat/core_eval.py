"""The CORE metric of the DCLM paper (https://arxiv.org/abs/2406.11794) for base models.

A CORE task is in-context learning in one of three shapes (the rows of DCLM's eval bundle):
  multiple_choice    {"query", "choices", "gold"}: which choice is the most likely continuation of the query
  schema             {"context_options", "continuation", "gold"}: after which context the continuation is most likely
  language_modeling  {"context", "continuation"}: does greedy decoding reproduce the continuation exactly
"Most likely" is the lowest mean loss over the continuation's tokens. Other examples of the task,
drawn with a seeded RNG, come first as shots. A task's accuracy is centered so that random guessing
scores 0 and a perfect model 1; the CORE score is the mean centered accuracy over the tasks.
"""

import csv
import io
import json
import os
import random
import tempfile
import zipfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from vibechat.common import VibechatError, print0
from vibechat.download import download_to_store
from vibechat.layout import EVAL_BUNDLE_DIR
from vibechat.storage import Store, open_store

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


@dataclass
class CoreTask:
    label: str
    task_meta: dict  # task_type, num_fewshot, continuation_delimiter
    data: list[dict]
    random_baseline: float  # the accuracy of guessing, 0..1


# -----------------------------------------------------------------------------
# prompts: each renders the item after its shots, once per candidate

def fewshot_examples(data: list[dict], idx: int, num_fewshot: int) -> list[dict]:
    """num_fewshot examples other than data[idx], the same ones every time for a given idx."""
    picks = random.Random(1234 + idx).sample(range(len(data) - 1), min(num_fewshot, len(data) - 1))
    return [data[i + (i >= idx)] for i in picks]  # skip idx itself


def render_prompts_mc(item: dict, delimiter: str, shots: list[dict]) -> list[str]:
    prefix = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
    return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_prompts_schema(item: dict, delimiter: str, shots: list[dict]) -> list[str]:
    prefix = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
    return [f"{prefix}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]


def render_prompts_lm(item: dict, delimiter: str, shots: list[dict]) -> list[str]:
    """[the prompt without the continuation, the prompt with it]."""
    prefix = "".join(f"{s['context'].strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
    context = f"{prefix}{item['context'].strip()}{delimiter}"
    # a trailing space belongs with the continuation's first token, as the tokenizer splits it
    return [context.rstrip(), context + item["continuation"]]


RENDERERS = {
    "multiple_choice": render_prompts_mc,
    "schema": render_prompts_schema,
    "language_modeling": render_prompts_lm,
}


def common_prefix_length(sequences: list[list[int]]) -> int:
    n = 0
    while all(len(s) > n for s in sequences) and len({s[n] for s in sequences}) == 1:
        n += 1
    return n


def continuation_spans(task_type: str, tokens: list[list[int]]) -> list[tuple[int, int]]:
    """For each sequence to score, the [start, end) of the tokens whose loss decides the answer."""
    if task_type == "multiple_choice":
        # the choices differ after a shared prefix; at least one token of each is scored
        start = min(common_prefix_length(tokens), min(len(t) for t in tokens) - 1)
        return [(start, len(t)) for t in tokens]
    if task_type == "schema":
        # the contexts differ, the continuation they share is scored
        suffix = min(common_prefix_length([t[::-1] for t in tokens]), min(len(t) for t in tokens) - 1)
        return [(len(t) - suffix, len(t)) for t in tokens]
    without, with_continuation = tokens
    return [(common_prefix_length([without, with_continuation]), len(with_continuation))]


def crop_left(tokens: list[int], span: tuple[int, int], max_len: int | None) -> tuple[list[int], tuple[int, int]]:
    """Keep the last max_len tokens (the model's context), moving the span with them."""
    if max_len is None or len(tokens) <= max_len:
        return tokens, span
    drop = len(tokens) - max_len
    return tokens[drop:], (max(span[0] - drop, 1), span[1] - drop)


@torch.no_grad()
def losses_and_predictions(model, sequences: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and greedy prediction, both (B, T-1); column t is about token t+1."""
    ids = torch.full((len(sequences), max(len(s) for s in sequences)), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
    ids = ids.to(device)
    logits = model(ids)[:, :-1].float()
    targets = ids[:, 1:]
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    return losses, logits.argmax(dim=-1)


def evaluate_example(idx: int, model, tokenizer, data: list[dict], device, task_meta: dict) -> bool:
    """Whether the model gets data[idx] right."""
    task_type = task_meta["task_type"]
    if task_type not in RENDERERS:
        raise VibechatError(f"unknown CORE task type {task_type!r}: use one of {', '.join(RENDERERS)}")
    item = data[idx]
    shots = fewshot_examples(data, idx, task_meta["num_fewshot"])
    prompts = RENDERERS[task_type](item, task_meta["continuation_delimiter"], shots)
    tokens = tokenizer.encode(prompts, prepend=tokenizer.get_bos_token_id())
    spans = continuation_spans(task_type, tokens)
    if task_type == "language_modeling":
        tokens = tokens[1:]  # only the prompt with the continuation goes through the model
    max_len = getattr(getattr(model, "config", None), "sequence_len", None)
    tokens, spans = zip(*(crop_left(t, span, max_len) for t, span in zip(tokens, spans)))
    losses, predictions = losses_and_predictions(model, list(tokens), tokenizer.get_bos_token_id(), device)
    if task_type == "language_modeling":
        start, end = spans[0]
        return predictions[0, start - 1 : end - 1].tolist() == list(tokens[0][start:end])
    mean_losses = [losses[i, start - 1 : end - 1].mean().item() for i, (start, end) in enumerate(spans)]
    return mean_losses.index(min(mean_losses)) == item["gold"]


def evaluate_task(model, tokenizer, data: list[dict], device, task_meta: dict) -> float:
    """Accuracy on a CORE task; with torch.distributed, rank r evaluates the examples idx % world == r."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank, len(data), world):
        correct[idx] = float(evaluate_example(idx, model, tokenizer, data, device, task_meta))
    if world > 1:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item()


def centered_accuracy(accuracy: float, random_baseline: float) -> float:
    """0 for random guessing, 1 for perfect."""
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def core_score(results: dict[str, dict]) -> float:
    """The mean centered accuracy of evaluate_core's results."""
    return sum(r["centered"] for r in results.values()) / len(results)


def evaluate_core(model, tokenizer, device, tasks: list[CoreTask], max_per_task: int = -1) -> dict[str, dict]:
    """{label: {"accuracy", "centered"}} for each task; max_per_task > 0 evaluates a fixed sample of each."""
    results = {}
    for task in tasks:
        data = task.data
        if 0 < max_per_task < len(data):
            data = random.Random(1337).sample(data, max_per_task)  # the same sample on every rank
        accuracy = evaluate_task(model, tokenizer, data, device, task.task_meta)
        centered = centered_accuracy(accuracy, task.random_baseline)
        results[task.label] = {"accuracy": accuracy, "centered": centered}
        print0(f"{task.label:<40} | accuracy {accuracy:.4f} | centered {centered:.4f}")
    return results


# -----------------------------------------------------------------------------
# DCLM's eval bundle: core.yaml (the tasks), eval_meta_data.csv (random baselines), eval_data/*.jsonl

def download_eval_bundle(store: Store, url: str = EVAL_BUNDLE_URL) -> None:
    """Unpack the eval bundle into the store under data/eval_bundle/ unless it is there already.

    core.yaml is written last, so its presence means the bundle is complete.
    """
    if store.exists(f"{EVAL_BUNDLE_DIR}/core.yaml"):
        return
    hint = (f"copy the unpacked bundle (core.yaml, eval_meta_data.csv, eval_data/) to {store.uri(EVAL_BUNDLE_DIR)}/, "
            "or evaluate with the offline stand-in CORE tasks")
    with tempfile.TemporaryDirectory() as tmp:
        download_to_store(url, open_store(tmp), "eval_bundle.zip", "the CORE eval bundle", hint)
        try:
            with zipfile.ZipFile(os.path.join(tmp, "eval_bundle.zip")) as bundle:
                names = [n for n in bundle.namelist() if n.startswith("eval_bundle/") and not n.endswith("/")]
                if "eval_bundle/core.yaml" not in names:
                    raise VibechatError(f"{url} is not the CORE eval bundle: it has no eval_bundle/core.yaml")
                for name in sorted(names, key=lambda n: n == "eval_bundle/core.yaml"):
                    store.put_bytes(f"{EVAL_BUNDLE_DIR}/{name.removeprefix('eval_bundle/')}", bundle.read(name))
        except zipfile.BadZipFile:
            raise VibechatError(f"{url} did not give a zip file; check the URL") from None


def load_eval_bundle(store: Store, url: str = EVAL_BUNDLE_URL) -> list[CoreTask]:
    """The CORE tasks of the eval bundle, downloading it into the store on first use."""
    download_eval_bundle(store, url)
    config = yaml.safe_load(store.get_text(f"{EVAL_BUNDLE_DIR}/core.yaml"))
    meta_rows = csv.DictReader(io.StringIO(store.get_text(f"{EVAL_BUNDLE_DIR}/eval_meta_data.csv")))
    baselines = {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in meta_rows}  # given in percent
    tasks = []
    for entry in config["icl_tasks"]:
        text = store.get_text(f"{EVAL_BUNDLE_DIR}/eval_data/{entry['dataset_uri']}")
        task_meta = {
            "task_type": entry["icl_task_type"],
            "num_fewshot": entry["num_fewshot"][0],
            "continuation_delimiter": entry.get("continuation_delimiter", " "),
        }
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
        tasks.append(CoreTask(entry["label"], task_meta, data, baselines[entry["label"]]))
    return tasks


# -----------------------------------------------------------------------------
# offline stand-ins: generated tasks in the three CORE shapes, for runs without a network.
# They are named "(stand-in)": their scores are not CORE scores.

NAMES = ["Alice", "Bob", "Carol", "Dan", "Eve", "Frank", "Gina", "Hank", "Ivy", "Jack"]
COMPARATIVES = [("taller", "shorter"), ("older", "younger"), ("faster", "slower"),
                ("heavier", "lighter"), ("richer", "poorer"), ("stronger", "weaker")]
SEQUENCES = [
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split(),
    "January February March April May June July August September October November December".split(),
    list("abcdefghijklmnopqrstuvwxyz"),
    "one two three four five six seven eight nine ten eleven twelve".split(),
]


def bigger_number(rng: random.Random) -> dict:
    a, b = rng.sample(range(1, 100), 2)
    query = f"Question: Which is bigger, {a} or {b}?\nAnswer:"
    return {"query": query, "choices": [str(a), str(b)], "gold": int(b > a)}


def addition(rng: random.Random) -> dict:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    choices = [a + b, a + b + 1, a + b - 1, a + b + 10]
    rng.shuffle(choices)
    return {"query": f"{a} + {b} =", "choices": [str(c) for c in choices], "gold": choices.index(a + b)}


def comparison(rng: random.Random) -> dict:
    x, y = rng.sample(NAMES, 2)
    word, opposite = rng.choice(COMPARATIVES)
    contexts = [f"{x} is {word} than {y}, so {y} is", f"{x} is {opposite} than {y}, so {y} is"]
    gold = rng.randint(0, 1)
    if gold == 1:
        contexts.reverse()
    return {"context_options": contexts, "continuation": f"{opposite} than {x}.", "gold": gold}


def sequence(rng: random.Random) -> dict:
    if rng.random() < 0.5:
        start, step = rng.randint(0, 50), rng.randint(1, 5)
        items = [str(start + i * step) for i in range(6)]
    else:
        words = rng.choice(SEQUENCES)
        i = rng.randint(0, len(words) - 6)
        items = words[i : i + 6]
    return {"context": " ".join(items[:-1]), "continuation": items[-1]}


STANDINS = [
    ("bigger_number (stand-in)", "multiple_choice", bigger_number, 0.5),
    ("addition (stand-in)", "multiple_choice", addition, 0.25),
    ("comparison (stand-in)", "schema", comparison, 0.5),
    ("sequence (stand-in)", "language_modeling", sequence, 0.0),
]


def standin_core_tasks(num_examples: int = 200, num_fewshot: int = 3) -> list[CoreTask]:
    """Generated CORE-shaped tasks (the same every time) for evaluating a base model offline."""
    tasks = []
    for label, task_type, make, baseline in STANDINS:
        rng = random.Random(f"core-standin/{label}")
        data = [make(rng) for _ in range(num_examples)]
        task_meta = {"task_type": task_type, "num_fewshot": num_fewshot, "continuation_delimiter": " "}
        tasks.append(CoreTask(label, task_meta, data, baseline))
    return tasks
