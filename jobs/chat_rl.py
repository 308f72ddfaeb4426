"""Reinforcement learning phase: on-policy policy gradient on math word problems, from the SFT model.

    python -m jobs.chat_rl                                    # arithmetic stand-in, offline
    torchrun --nproc_per_node=8 -m jobs.chat_rl --task=gsm8k

Each step takes --examples-per-step training questions (spread over the ranks), samples --num-samples answers
to each with the Engine (calculator included), and rewards each answer by the task (1 for the right final
number). An answer's advantage is its reward minus the mean reward of its question's answers. The loss is
-advantage x log-probability, summed over the sampled tokens only (not the prompt, not the calculator's
forced output) and divided by the number of sampled tokens of the step over all ranks. Samples come from
the current model, so there is no ratio to clip and no reference model. The LR falls linearly to zero.
Every --eval-every steps, pass@k on held-out questions goes to metrics/rl.jsonl.

Resumes from the newest committed checkpoint of checkpoints/rl/<model_tag>/ with the model, every rank's
optimizer state and the RNG; the questions and sampling seeds of a step depend only on its number.
"""

import argparse
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from jobs.phase import (add_training_args, check_loss, end_phase, eval_due, load_phase_model, progress_line,
                        restore_training_state, save_due, save_training_checkpoint, start_phase)
from jobs.training import collate, global_sum, make_optimizers, set_lr, step_optimizers
from tasks.registry import get_task
from vibechat.common import VibechatError, positive_int, print0, run_main, steps_or_auto
from vibechat.engine import Engine
from vibechat.metrics import MetricsLogger, system_metrics


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["sft", "mid"], default="sft", help="the model to start from")
    p.add_argument("--task", default="arithmetic-standin",
                   help="a generative task with train and test splits: gsm8k, or the offline arithmetic-standin")
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default: the source's largest model)")
    p.add_argument("--device-batch-size", type=positive_int, default=8, help="samples per generation and forward pass")
    p.add_argument("--examples-per-step", type=positive_int, default=16,
                   help="questions per optimizer step over all ranks")
    p.add_argument("--num-samples", type=positive_int, default=16, help="answers sampled per question")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--num-epochs", type=int, default=1, help="passes over the training questions")
    p.add_argument("--num-iterations", type=steps_or_auto, default=-1, help="optimizer steps; -1: from --num-epochs")
    p.add_argument("--eval-every", type=int, default=60, help="steps between pass@k evaluations")
    p.add_argument("--eval-examples", type=int, default=400, help="held-out questions per evaluation")
    p.add_argument("--eval-samples", type=int, default=8, help="k of pass@k: answers sampled per held-out question")
    add_training_args(p, save_every=60, init_lr_frac=0.05)
    return p.parse_args(argv)


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Each answer's reward minus the mean reward of the answers to the same question."""
    return rewards - rewards.mean()


def rollout_batch(sequences: list[list[int]], masks: list[list[int]], rewards: list[float],
                  pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, advantages) of one question's sampled answers, as the Engine returns them (prompt and
    answer, mask 1 on sampled tokens): targets are -1 except where the next token was sampled."""
    inputs, targets = collate(list(zip(sequences, masks)), pad_id)
    return inputs, targets, advantages(torch.tensor(rewards, dtype=torch.float32))


def rl_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
            num_tokens: torch.Tensor | int | None = None) -> torch.Tensor:
    """Policy-gradient loss: -sum of advantage x log-probability over the sampled tokens (mask), divided by
    num_tokens (default: this batch's sampled tokens). logp and mask are (B, T), advantages (B,)."""
    if num_tokens is None:
        num_tokens = mask.sum().clamp(min=1)
    return -(logp * advantages[:, None] * mask).sum() / num_tokens


def rl_backward(model, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                autocast_ctx=nullcontext) -> torch.Tensor:
    """Backward of one step's loss over (inputs, targets, advantages) micro-batches; returns the loss.

    Normalized like sft_backward: by the sampled tokens of the whole step, all micro-batches of all ranks.
    """
    num_tokens = global_sum(sum((y >= 0).sum() for _, y, _ in batches)).clamp(min=1)
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    total = torch.zeros((), device=batches[0][0].device)
    for x, y, adv in batches:
        with autocast_ctx():
            logp = -model(x, y, loss_reduction="none").view_as(y)
        loss = rl_loss(logp, adv, y >= 0, num_tokens)
        # the distributed optimizers average gradients over ranks: times world_size makes that the global sum
        (loss * world_size).backward()
        total += loss.detach()
    return global_sum(total)


def sample_answers(engine: Engine, tokenizer, conversation: dict, num_samples: int, batch_size: int, seed: int,
                   **sampling) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """(prompt, sequences, masks) of num_samples answers, generated batch_size at a time."""
    prompt = tokenizer.render_for_completion(conversation)
    context = engine.model.config.sequence_len
    if len(prompt) >= context:
        raise VibechatError(f"a question of {len(prompt)} tokens leaves no room in the model's context of {context}: "
                            "RL needs a model pretrained with a longer context (base_train --max-seq-len)")
    sequences, masks = [], []
    for start in range(0, num_samples, batch_size):
        seqs, ms = engine.generate_batch(prompt, num_samples=min(batch_size, num_samples - start),
                                         seed=seed + start, **sampling)
        sequences += seqs
        masks += ms
    return prompt, sequences, masks


def pass_at_k(engine: Engine, tokenizer, task, num_examples: int, k: int, batch_size: int, rank: int,
              world_size: int, **sampling) -> list[float]:
    """[pass@1, ..., pass@k] over the first num_examples questions of task: the fraction with a right answer
    among the first j samples. Ranks split the questions; every rank returns the totals."""
    device = engine.model.get_device()
    solved, count = torch.zeros(k, device=device), torch.zeros((), device=device)
    for index in range(rank, min(num_examples, len(task)), world_size):
        conversation = task[index]
        prompt, sequences, _ = sample_answers(engine, tokenizer, conversation, k, batch_size, seed=index * k,
                                              **sampling)
        correct = torch.tensor([task.evaluate(conversation, tokenizer.decode(s[len(prompt):])) for s in sequences])
        solved += correct.cumsum(0).clamp(max=1).to(device)
        count += 1
    return (global_sum(solved) / global_sum(count).clamp(min=1)).tolist()


def main(argv=None) -> None:
    from vibechat.report import get_report

    args = parse_args(argv)
    rank, world_size, device, autocast_ctx = start_phase(args)

    train_task, eval_task = get_task(args.task, split="train"), get_task(args.task, split="test")
    if train_task.eval_type != "generative":
        raise VibechatError(f"--task {args.task} is {train_task.eval_type}: RL needs a generative task whose answers "
                            "can be rewarded, such as gsm8k or arithmetic-standin")
    if args.examples_per_step % world_size:
        raise VibechatError(f"--examples-per-step {args.examples_per_step} is not a multiple of the {world_size} ranks")
    start = load_phase_model("rl", args.source, args.model_tag, device, world_size)
    model, tokenizer, start_step = start.model, start.tokenizer, start.step
    engine = Engine(model, tokenizer)
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    sampling = dict(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
    B, examples_per_rank = args.device_batch_size, args.examples_per_step // world_size
    num_iterations = args.num_iterations
    if num_iterations <= 0:
        num_iterations = max(1, args.num_epochs * len(train_task) // args.examples_per_step)
    print0(f"RL on {train_task.name} from {start.model_tag} ({args.source} step {start.source_step}): "
           f"{num_iterations} steps of {args.examples_per_step} questions x {args.num_samples} samples")

    optimizers = make_optimizers(model, args, args.init_lr_frac)
    restore_training_state(optimizers, start.optim_data)  # no data position: a step's questions follow from its number
    metrics = MetricsLogger("rl", resume_step=start_step)
    passes = start.meta.get("pass_at_k")
    train_seconds = start.meta.get("train_seconds", 0.0)

    step = start_step
    while True:
        last = step == num_iterations
        if eval_due(step, args.eval_every, start_step, num_iterations):
            with autocast_ctx():
                passes = pass_at_k(engine, tokenizer, eval_task, args.eval_examples, args.eval_samples, B, rank,
                                   world_size, **sampling)
            print0(f"step {step}/{num_iterations} | " + " | ".join(f"pass@{j + 1} {p:.4f}"
                                                                   for j, p in enumerate(passes)))
            metrics.log(step=step, **{f"pass@{j + 1}": p for j, p in enumerate(passes)})
        if save_due(step, args.save_every, start_step, num_iterations):
            save_training_checkpoint(start.checkpoint_dir, step, model, optimizers, None, args, world_size,
                                     source=args.source, source_step=start.source_step, num_iterations=num_iterations,
                                     pass_at_k=passes, train_seconds=train_seconds)
        if last:
            break
        lr_mult = 1.0 - step / num_iterations
        set_lr(optimizers, lr_mult)
        t0 = time.time()
        batches, rewards, sampled_tokens = [], [], 0
        for i in range(examples_per_rank):
            question = step * args.examples_per_step + i * world_size + rank  # a function of the step: resumable
            conversation = train_task[question % len(train_task)]
            with autocast_ctx():
                prompt, sequences, masks = sample_answers(engine, tokenizer, conversation, args.num_samples, B,
                                                          seed=question * args.num_samples, **sampling)
            answer_rewards = [train_task.reward(conversation, tokenizer.decode(s[len(prompt):])) for s in sequences]
            inputs, targets, adv = rollout_batch(sequences, masks, answer_rewards, pad_id)
            batches += [(inputs[j:j + B].to(device), targets[j:j + B].to(device), adv[j:j + B].to(device))
                        for j in range(0, len(sequences), B)]
            rewards += answer_rewards
            sampled_tokens += sum(map(sum, masks))
        loss = rl_backward(model, batches, autocast_ctx).item()
        step_optimizers(optimizers)
        totals = global_sum(torch.tensor([sum(rewards), len(rewards), sampled_tokens], dtype=torch.float64,
                                         device=device)).tolist()
        mean_reward, mean_length = totals[0] / totals[1], totals[2] / totals[1]
        dt = time.time() - t0
        train_seconds += dt
        step += 1
        check_loss(loss, step, "lower the learning rate (--init-lr-frac)")
        if step % args.log_every == 0 or step == num_iterations:
            record = dict(loss=loss, reward=mean_reward, answer_tokens=mean_length, lr=lr_mult, dt=dt)
            print0(progress_line(step, num_iterations, record))
            metrics.log(step=step, **record, **system_metrics(device))

    results = {"model": start.model_tag, f"{args.source} step": start.source_step, "iterations": num_iterations,
               "train time (min)": round(train_seconds / 60, 2), "ranks": world_size}
    if passes:
        results.update({f"held-out pass@{j + 1}": p for j, p in enumerate(passes)})
    get_report().log(section="Chat RL", data=[vars(args), results])
    end_phase()


if __name__ == "__main__":
    run_main(main)
