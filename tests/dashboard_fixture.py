"""A store holding one small but real run, for the dashboard's tests and screenshots.

fill_store(url, run_id) writes what a tiny run leaves behind: a trained 300-token tokenizer; base and sft
checkpoints of a depth-1 GPT that answers four questions, two with a calculator call; metrics of the base
and sft phases and of their evaluations; a report; a run.json whose rl phase failed on both attempts; and the
log of every attempt.
"""

import math
import random
import time
from dataclasses import asdict

import torch

from jobs import pipeline
from jobs.config import load_config
from jobs.runstore import write_run
from vibechat.checkpoint_manager import save_checkpoint
from vibechat.gpt import GPT, GPTConfig
from vibechat.layout import in_run, log_key
from vibechat.metrics import MetricsLogger
from vibechat.report import Report
from vibechat.storage import open_store
from vibechat.tokenizer import RustBPETokenizer

SENTENCES = [
    "The sky is blue because air scatters blue light more than red light.",
    "Two plus three is five, and twelve times seven is eighty four.",
    "Hello there! How are you today? I am fine, thank you for asking.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "Paris is the capital of France; Rome is the capital of Italy.",
    "Water boils at one hundred degrees Celsius at sea level.",
]
TEXTS = [f"{sentence} ({i})" for i in range(12) for sentence in SENTENCES]  # about 5 KB
RL_ERROR = "exited with code 2: error: loss became nan at step 12: lower the learning rates or check the data"
FAILED_PHASE = "rl"
CHECKPOINT_STEPS = {"base": 200, "sft": 60}
# what the checkpoint's model answers (it is trained on these); the second one calls the calculator
CONVERSATIONS = [
    ("hello there", "Hello! I am a tiny vibechat model. How are you today?"),
    ("What is 12 times 7?", [{"type": "text", "text": "Let me compute it: "}, {"type": "python", "text": "12*7"},
                             {"type": "python_output", "text": "84"}, {"type": "text", "text": ". The answer is 84."}]),
    ("Why is the sky blue?", "The sky is blue because air scatters blue light more than red light."),
    ("What is 7 times 7?", [{"type": "text", "text": "So 7*7="}, {"type": "python", "text": "7*7"},
                            {"type": "python_output", "text": "49"}, {"type": "text", "text": "49 apples.\n#### 49"}]),
]


def tiny_chat_model(tokenizer: RustBPETokenizer, seed: int) -> GPT:
    """A depth-1 GPT trained until it knows CONVERSATIONS by heart, calculator call included (a second or two)."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2,
                       n_embd=64)
    model = GPT(config)
    model.init_weights()
    rows = [tokenizer.render_conversation({"messages": [{"role": "user", "content": question},
                                                        {"role": "assistant", "content": answer}]})
            for question, answer in CONVERSATIONS]
    length = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.zeros(len(rows), length, dtype=torch.long)
    targets = torch.full((len(rows), length), -1)  # -1: not trained on (the prompt, the tool's output, padding)
    for i, (ids, mask) in enumerate(rows):
        inputs[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[i, :len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small train faster on one thread, much faster on a busy machine
    try:
        for _ in range(40):
            loss = model(inputs, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def write_metrics(base: str, seed: int) -> None:
    """Curves shaped like a real run's; each seed learns at its own pace, so overlaid runs are told apart."""
    rng = random.Random(seed)
    pace = 50 + 40 * seed
    base_log = MetricsLogger("base", base_dir=base)
    for step in range(1, 201):
        loss = 5.5 * math.exp(-step / pace) + 2.2 + rng.gauss(0, 0.05)
        base_log.log(step=step, loss=loss, lr=min(1.0, (200 - step) / 40 + 0.05),
                     tok_per_sec=41000 - 6000 * seed + rng.gauss(0, 900), mfu=0.31 - 0.05 * seed + rng.gauss(0, 0.01),
                     gpu_memory_gib=11.5 + 2 * seed, tokens=step * 4096)
        if step % 50 == 0:
            base_log.log(step=step, val_bpb=1.9 * math.exp(-step / (pace * 1.6)) + 0.95, tokens=step * 4096)
    sft_log = MetricsLogger("sft", base_dir=base)
    for step in range(1, 61):
        loss = 2.0 * math.exp(-step / (30 + 10 * seed)) + 1.1 + rng.gauss(0, 0.04)
        sft_log.log(step=step, loss=loss, lr=1 - step / 60)
    for stage, scores in {"base": {"CORE": 0.061 + seed / 100},
                          "sft": {"ARC-Easy": 0.31, "MMLU": 0.27 + seed / 100, "GSM8K": 0.02}}.items():
        eval_log = MetricsLogger(f"{stage}_eval", base_dir=base)
        for task, score in scores.items():
            eval_log.log(task=task, score=score)


def write_run_json(store, run_id: str, seed: int) -> None:
    """The run as the controller records it: every phase up to rl done, rl failed on both its attempts."""
    now = time.time() - 600 * seed
    run = pipeline.new_run(run_id, "tiny", load_config("tiny"), "local", now - 1800)
    clock = now - 1790
    for phase in pipeline.PHASES[:pipeline.PHASES.index(FAILED_PHASE)]:
        pipeline.mark_running(run, phase, 1, f"vibechat-{run_id}-{phase}-1", clock)
        clock += 60 if phase in ("base", "mid", "sft") else 15
        pipeline.mark_succeeded(run, phase, clock)
    for attempt in (1, 2):
        clock = max(clock, run.phases[FAILED_PHASE].ended_at or clock) + 10
        pipeline.mark_running(run, FAILED_PHASE, attempt, f"vibechat-{run_id}-{FAILED_PHASE}-{attempt}", clock)
        clock += 40
        pipeline.mark_failed(run, FAILED_PHASE, RL_ERROR, clock)
    write_run(store, run, None)
    for phase, p in run.phases.items():  # the output of each attempt, as the controller copies it into the store
        for attempt in range(1, p.attempt + 1):
            lines = [f"{phase} attempt {attempt}: step {step}/10 | loss {3 - step / 10:.2f}" for step in range(1, 11)]
            if phase == FAILED_PHASE:
                lines.append(RL_ERROR.split(": ", 1)[1])
            store.put_text(in_run(run_id, log_key(phase, attempt)), "\n".join(lines) + "\n")


def fill_store(store_url: str, run_id: str = "tiny-demo", seed: int = 0) -> None:
    """Write one run, runs/<run_id>/..., into the store at store_url (a local path, file:// or s3:// URL)."""
    store = open_store(store_url)
    base = store.uri(f"runs/{run_id}")
    tokenizer = RustBPETokenizer.train_from_iterator(iter(TEXTS), vocab_size=300)
    tokenizer.save(f"{base}/tokenizer")
    model = tiny_chat_model(tokenizer, seed)
    for source, step in CHECKPOINT_STEPS.items():
        save_checkpoint(f"{base}/checkpoints/{source}/d1", step, model.state_dict(), None,
                        {"step": step, "model_config": asdict(model.config)})
    write_metrics(base, seed)
    report = Report(f"{base}/report")
    report.log("Base model training", [{"depth": 1, "iterations": 200, "final val bpb": 1.03}])
    report.log("Chat SFT", [{"iterations": 60, "final loss": 1.2}])
    report.generate()
    write_run_json(store, run_id, seed)
