"""What the controller asks of a backend: start a phase job, say how it is doing, stop it, show its logs.

Two backends implement it: local (child processes) and kubernetes (PyTorchJobs)."""

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class PhaseJob:
    """One attempt of one phase of one run. `name` is deterministic, so a restarted controller finds it again."""

    run_id: str
    phase: str  # a phase name from jobs.pipeline, e.g. "base" or "sft_eval"
    attempt: int
    module: str  # the program: python -m <module>, e.g. "jobs.base_train"
    args: list[str] = field(default_factory=list)  # e.g. ["--depth=4", "--num-iterations=20"]
    env: dict[str, str] = field(default_factory=dict)  # VIBECHAT_STORE, VIBECHAT_RUN, ...
    nnodes: int = 1
    nproc_per_node: int = 1
    gpus_per_node: int = 0  # 0: CPU job
    resources: dict = field(default_factory=dict)  # the phase's config `resources`: cpu, memory, ... per node

    @property
    def name(self) -> str:
        return job_name(self.run_id, self.phase, self.attempt)


def job_name(run_id: str, phase: str, attempt: int) -> str:
    """vibechat-<run>-<phase>-<attempt>, in DNS-1035 form (lowercase, '-' for '_')."""
    return f"vibechat-{run_id}-{phase}-{attempt}".lower().replace("_", "-")


@dataclass
class JobStatus:
    state: str  # "missing" | "pending" | "running" | "succeeded" | "failed"
    message: str = ""  # the error of a failed job, or what it is waiting for
    restarts: int = 0


class Backend(Protocol):
    def submit(self, job: PhaseJob) -> None:
        """Start the job; if a job of that name already exists, adopt it (never start a second copy)."""

    def status(self, job: PhaseJob) -> JobStatus: ...

    def stop(self, job: PhaseJob) -> None: ...

    def logs(self, job: PhaseJob) -> str: ...

    def idle(self) -> None:
        """Wait until a job may have changed (a short sleep, or a watch event), before the next check."""
