"""The controller's console: a phase's output as it comes, with its `step N/M | loss X | tok/s Y` lines (the phase
programs' progress lines, jobs/phase.py) folded into one progress line with an ETA."""

import re
import sys
import time

from jobs.backends import PhaseJob
from vibechat.common import format_duration

STEP = re.compile(r"\bstep\s+(\d+)\s*/\s*(\d+)")
LOSS = re.compile(r"\bloss\s+([-+0-9.eE]+|nan|inf)")
TOKS = re.compile(r"\btok/s\s+([0-9][0-9,.]*)")


class Console:
    """Prints a phase's output; its `step N/M | loss X | tok/s Y` lines become one progress line with an ETA."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix  # the run id, where several runs share one console
        self.tty = sys.stdout.isatty()
        self.progress_shown = False
        self.first_step: dict[str, tuple[float, int]] = {}  # job name -> (time, step) of the first step line

    def say(self, message: str) -> None:
        self._end_progress()
        print(f"[{time.strftime('%H:%M:%S')}] {self.prefix}{message}", flush=True)

    def output(self, job: PhaseJob, text: str, now: float) -> None:
        for line in text.splitlines():
            step = STEP.search(line)
            loss, toks = LOSS.search(line), TOKS.search(line)
            # a step line that says more than loss and speed (`step 250/1000 | val bpb 0.91`) is shown as it is
            bare = step is not None and not STEP.sub("", line).strip(" |")
            if step is None or not (loss or toks or bare):
                self._end_progress()
                print(f"  {job.phase} | {line}", flush=True)
                continue
            done, total = int(step.group(1)), int(step.group(2))
            parts = [f"  {job.phase} | step {done}/{total}" + (f" ({100 * done // total}%)" if total else "")]
            if loss:
                parts.append(f"loss {loss.group(1)}")
            if toks:
                parts.append(f"tok/s {toks.group(1)}")
            t0, s0 = self.first_step.setdefault(job.name, (now, done))
            if done > s0 and total >= done:
                parts.append(f"eta {format_duration((total - done) * (now - t0) / (done - s0))}")
            if self.tty:
                print("\r\033[K" + " | ".join(parts), end="", flush=True)
                self.progress_shown = True
            else:
                print(" | ".join(parts), flush=True)

    def _end_progress(self) -> None:
        if self.progress_shown:
            print(flush=True)
            self.progress_shown = False

