"""Chat evaluation phase: a chat model's accuracy on tasks, and ChatCORE over them.

    python -m jobs.chat_eval --source sft                         # the ChatCORE tasks (ARC, MMLU, GSM8K download)
    python -m jobs.chat_eval --source sft -a HumanEval --max-problems 20
    python -m jobs.chat_eval --source sft -a multiple-choice-standin,arithmetic-standin,humaneval,spellingbee
    torchrun --nproc_per_node=8 -m jobs.chat_eval --source sft    # ranks split the problems

Tasks are named as the registry names them or as reports do, in any case (arc-easy, ARC-Easy). Each is evaluated
on its test split. Multiple-choice tasks are scored without sampling: after the question, the answer is the choice
whose letter gets the highest logit where the reply begins. Generative tasks sample replies through the Engine
(calculator included) and grade them with the task's evaluate; a problem counts as solved when any of its
--num-samples replies is right. A prompt longer than the model's context keeps its last tokens, as in CORE.

ChatCORE is the mean centered accuracy: 0 for guessing (one over the number of choices; 0 for generative tasks),
1 for perfect. It is recorded as "ChatCORE" only when all of ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval and
SpellingBee were evaluated (then over those six); a set with offline stand-ins is "ChatCORE (stand-in)", any other
set "ChatCORE (partial)". The default -a is the real set, which needs the network once: offline presets (tiny,
ci) pass stand-ins instead.

Scores go to metrics/<source>_eval.jsonl, one {"task", "score", ...} record per task under the task's own name
(stand-ins keep theirs) and one for ChatCORE, and to the report section "Chat evaluation <source>".
"""

import argparse
from dataclasses import dataclass

import torch
import torch.distributed as dist

from jobs.phase import add_device_args, end_phase, load_eval_model, start_phase
from tasks.common import Task
from tasks.registry import TASKS, get_task, task_parameters
from vibechat.common import VibechatError, print0, run_main
from vibechat.core_eval import centered_accuracy
from vibechat.engine import Engine
from vibechat.metrics import MetricsLogger

CHATCORE_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["sft", "mid", "rl", "base"], default="sft", help="the model to evaluate")
    p.add_argument("-a", "--tasks", default=",".join(CHATCORE_TASKS),
                   help="comma-separated tasks to evaluate (default: the ChatCORE set)")
    p.add_argument("--max-problems", type=int, default=None, help="evaluate the first N problems of each task")
    p.add_argument("--batch-size", type=int, default=8, help="multiple-choice prompts per forward pass")
    p.add_argument("--num-samples", type=int, default=1, help="replies sampled per generative problem")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest reply to a generative problem")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens")
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default: the source's largest model)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    add_device_args(p)
    args = p.parse_args(argv)
    for name in ("max_problems", "batch_size", "num_samples", "max_new_tokens", "top_k"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise VibechatError(f"--{name.replace('_', '-')} {value}: use a positive number")
    if not args.temperature >= 0:
        raise VibechatError(f"--temperature {args.temperature}: use 0 for greedy decoding or a positive value")
    return args


def load_tasks(spec: str) -> list[Task]:
    """The tasks of a comma-separated list, each on its test split; training-only tasks are refused."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise VibechatError(f"-a {spec!r} names no task: give comma-separated task names such as HumanEval")
    graded = [n for n, (cls, _) in TASKS.items() if cls.eval_type is not Task.eval_type]
    tasks = []
    for name in names:
        key = name.lower()
        cls, fixed = TASKS.get(key, (None, {}))
        if cls is not None and cls.eval_type is Task.eval_type:
            raise VibechatError(f"task {name!r} is training data with no grading: evaluate one of {', '.join(graded)}")
        takes_split = cls is not None and "split" in task_parameters(cls) and "split" not in fixed
        tasks.append(get_task(key, **({"split": "test"} if takes_split else {})))  # unknown: lists the known ones
    return tasks


@torch.no_grad()
def choose_letters(model, prompts: list[list[int]], letter_ids: list[list[int]], pad_id: int) -> list[int]:
    """For each prompt, the index of the choice whose letter token has the highest logit right after the prompt."""
    device = model.get_device()
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.full((len(prompts), max(len(p) for p in prompts)), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    logits = model(ids.to(device))
    # the padding comes after each prompt's last token, so causal attention keeps it out of that position
    answer_logits = logits[torch.arange(len(prompts), device=device), lengths - 1]
    return [int(answer_logits[i, letters].argmax()) for i, letters in enumerate(letter_ids)]


@dataclass
class TaskResult:
    name: str
    eval_type: str
    problems: int
    accuracy: float
    baseline: float  # the accuracy of guessing
    cropped: int  # prompts longer than the model's context, cut to their last tokens

    @property
    def centered(self) -> float:
        return centered_accuracy(self.accuracy, self.baseline)


def evaluate_chat_task(task: Task, model, tokenizer, engine: Engine, args, rank: int, world_size: int) -> TaskResult:
    """Accuracy on the first --max-problems problems of task; rank r takes problems r, r + W, ..."""
    num_problems = len(task) if args.max_problems is None else min(args.max_problems, len(task))
    context = model.config.sequence_len
    solved = chance = cropped = 0.0
    indices = list(range(rank, num_problems, world_size))
    if task.eval_type == "multiple_choice":
        pad_id = tokenizer.encode_special("<|assistant_end|>")  # any id: it sits after every prompt's last token
        for start in range(0, len(indices), args.batch_size):
            conversations = [task[i] for i in indices[start : start + args.batch_size]]
            prompts = [tokenizer.render_for_completion(c) for c in conversations]
            cropped += sum(len(p) > context for p in prompts)
            # a letter is one byte, so one token, the same one the assistant writes as its whole reply
            letter_ids = [[tokenizer.encode(letter)[0] for letter in c["letters"]] for c in conversations]
            choices = choose_letters(model, [p[-context:] for p in prompts], letter_ids, pad_id)
            for c, choice in zip(conversations, choices):
                solved += task.evaluate(c, c["letters"][choice])
                chance += 1 / len(c["letters"])
    else:
        for i in indices:
            conversation = task[i]
            prompt = tokenizer.render_for_completion(conversation)
            cropped += len(prompt) > context
            prompt = prompt[-context:]
            replies, _ = engine.generate_batch(prompt, num_samples=args.num_samples, max_tokens=args.max_new_tokens,
                                               temperature=args.temperature, top_k=args.top_k, seed=i)
            solved += any(task.evaluate(conversation, tokenizer.decode(r[len(prompt):])) for r in replies)
    totals = torch.tensor([solved, chance, cropped], dtype=torch.float64, device=model.get_device())
    if world_size > 1:
        dist.all_reduce(totals)
    solved, chance, cropped = totals.tolist()
    return TaskResult(task.name, task.eval_type, num_problems, solved / max(num_problems, 1),
                      chance / max(num_problems, 1), int(cropped))


def chatcore(results: list[TaskResult]) -> tuple[str, float]:
    """(the name to record it under, the mean centered accuracy): "ChatCORE" only over the full real set."""
    by_name = {r.name: r for r in results}
    if all(name in by_name for name in CHATCORE_TASKS):
        return "ChatCORE", sum(by_name[name].centered for name in CHATCORE_TASKS) / len(CHATCORE_TASKS)
    label = "ChatCORE (stand-in)" if any("(stand-in)" in r.name for r in results) else "ChatCORE (partial)"
    return label, sum(r.centered for r in results) / len(results)


def results_table(results: list[TaskResult], label: str, score: float) -> list[str]:
    lines = ["| Task | Type | Problems | Accuracy | Baseline | Centered |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r.name} | {r.eval_type} | {r.problems} | {r.accuracy:.4f} | {r.baseline:.4f} | {r.centered:.4f} |"
              for r in results]
    lines.append(f"| {label} | | | | | {score:.4f} |")
    return lines


def main(argv=None) -> None:
    from vibechat.report import get_report

    args = parse_args(argv)
    rank, world_size, device, autocast_ctx = start_phase(args)
    tasks = load_tasks(args.tasks)  # before the model: a bad name or a missing dataset fails fast
    model, tokenizer, meta, model_tag = load_eval_model(args.source, args.model_tag, args.step, device)
    engine = Engine(model, tokenizer)
    print0(f"evaluating {args.source} model {model_tag} step {meta['step']} on {', '.join(t.name for t in tasks)}")

    results = []
    for number, task in enumerate(tasks, 1):
        with autocast_ctx():
            result = evaluate_chat_task(task, model, tokenizer, engine, args, rank, world_size)
        results.append(result)
        note = f" | {result.cropped} prompts cropped to the context" if result.cropped else ""
        print0(f"step {number}/{len(tasks)} | {result.name} | accuracy {result.accuracy:.4f} | "
               f"centered {result.centered:.4f}{note}")
    label, score = chatcore(results)
    table = results_table(results, label, score)
    print0("\n".join(table))

    metrics = MetricsLogger(f"{args.source}_eval")
    common = {"model_tag": model_tag, "model_step": meta["step"]}
    for r in results:
        metrics.log(task=r.name, score=r.accuracy, centered=r.centered, baseline=r.baseline, eval_type=r.eval_type,
                    problems=r.problems, cropped_prompts=r.cropped, **common)
    metrics.log(task=label, score=score, tasks=[r.name for r in results], **common)
    get_report().log(section=f"Chat evaluation {args.source}", data=[
        vars(args), {"model": model_tag, "step": meta["step"], label: score}, *table,
    ])
    end_phase()


if __name__ == "__main__":
    run_main(main)
