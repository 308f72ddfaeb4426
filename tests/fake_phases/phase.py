"""A stand-in phase for the controller tests: counts steps like a trainer and leaves a trail in the store.

    python -m tests.fake_phases.phase --phase=base --steps=4 [--sleep=0.05] [--fail-starts=1] [--gate=PATH]

It checkpoints after every step (checkpoints/<phase>/step) and resumes from there, so a restarted
attempt continues instead of starting over. In fake/<phase>/ it appends one line per start
(`start <step> <pid>`) and one per completion, and records the environment it was given.
--gate=PATH blocks after the first step until PATH exists, so a test can act mid-phase;
--fail-starts=N makes the first N starts fail.
"""

import argparse
import json
import os
import time

from vibechat.common import VibechatError, get_base_dir, run_main
from vibechat.storage import open_store


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--phase", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--fail-starts", type=int, default=0)
    p.add_argument("--gate")
    args, _ = p.parse_known_args()  # the preset's flags for the real program are none of our business
    store = open_store(get_base_dir())
    trail, ckpt = f"fake/{args.phase}", f"checkpoints/{args.phase}/step"
    step = int(store.get_text(ckpt)) if store.exists(ckpt) else 0
    store.append_text(f"{trail}/starts", f"start {step} {os.getpid()}\n")
    starts = len(store.get_text(f"{trail}/starts").splitlines())
    env = {k: os.environ.get(k) for k in ("VIBECHAT_STORE", "VIBECHAT_RUN", "VIBECHAT_DATASET", "PYTHONUNBUFFERED",
                                          "OMP_NUM_THREADS")}
    store.put_text(f"{trail}/env.json", json.dumps(env))
    print(f"fake {args.phase}: start {starts}, from step {step}", flush=True)
    if starts <= args.fail_starts:
        raise VibechatError(f"fake {args.phase} failing on purpose (start {starts})")
    while step < args.steps:
        if args.gate and step == 1:
            while not os.path.exists(args.gate):
                time.sleep(0.05)
        time.sleep(args.sleep)
        step += 1
        store.put_text(ckpt, str(step))
        print(f"step {step}/{args.steps} | loss {3.0 / step:.4f} | tok/s {1000 * step}", flush=True)
    store.append_text(f"{trail}/completions", "done\n")


if __name__ == "__main__":
    run_main(main)
