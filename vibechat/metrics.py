"""Training metrics: rank 0 appends one JSON object per logged step to <base>/metrics/<phase>.jsonl
and, when VIBECHAT_METRICS_PORT is set, serves the latest values for Prometheus.

A metrics file is stored as segments of at most SEGMENT_BYTES: <phase>.jsonl, then <phase>.jsonl.000001, ...
S3 has no append, so each logged line rewrites its object; segments keep that rewrite small however long the
run, while every line is readable as soon as log() returns. read_metrics joins the segments.

Each step is recorded once, however often a phase is killed and resumed: a training phase opens its logger with the
step it starts from (resume_step), and the logger first drops the records of later steps, which an attempt that died
after that checkpoint had logged and the resumed one logs again. Records without a step are kept."""

import json
import os
import time

import psutil

from vibechat.common import get_base_dir, get_dist_info
from vibechat.layout import metrics_key
from vibechat.storage import open_store

_GAUGES = {}  # name -> Gauge, per process: prometheus refuses a second gauge of the same name
SEGMENT_BYTES = 256 * 1024


def segment_keys(store, key: str) -> list[str]:
    """The objects of a metrics file in order: key, then key.000001, key.000002, ..."""
    folder = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
    number = {k: int(k[len(key) + 1:] or 0) for k in store.list(folder)
              if k == key or (k.startswith(key + ".") and k[len(key) + 1:].isdigit())}
    return sorted(number, key=number.get)


class MetricsLogger:
    """log(step=..., loss=...) appends a line; rank != 0 does nothing.

    resume_step: the checkpoint step a training phase starts from (0: afresh), whose later records are dropped;
    None (evaluations) keeps every record."""

    def __init__(self, phase: str, base_dir: str | None = None, resume_step: int | None = None):
        self.phase = phase
        _, rank, _, _ = get_dist_info()
        self.enabled = rank == 0
        self.store = open_store(base_dir or get_base_dir())
        self.key = metrics_key(phase)
        self._segment: tuple[str, int] | None = None  # (key, bytes) of the segment lines go to; found at the first log
        if self.enabled and resume_step is not None:
            self._drop_steps_after(resume_step)
        port = os.environ.get("VIBECHAT_METRICS_PORT")
        if self.enabled and port:
            from prometheus_client import start_http_server

            start_http_server(int(port))

    def log(self, **values) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), "phase": self.phase, **values}
        line = json.dumps(record) + "\n"
        key, size = self._segment or self._last_segment()
        if size and size + len(line) > SEGMENT_BYTES:
            number = 0 if key == self.key else int(key[len(self.key) + 1:])
            key, size = f"{self.key}.{number + 1:06d}", 0
        self.store.append_text(key, line)
        self._segment = key, size + len(line)
        self._export(values)

    def _drop_steps_after(self, resume_step: int) -> None:
        """Rewrite the segments without the records past resume_step (every stepped record when starting afresh:
        no checkpoint is at step 0)."""
        def replayed(line: str) -> bool:
            try:
                step = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                return False  # not ours to judge: read_metrics counts it as corrupt
            return isinstance(step, int) and (step > resume_step or resume_step == 0)

        for key in segment_keys(self.store, self.key):
            text = self.store.get_text(key)
            kept = "".join(line for line in text.splitlines(keepends=True) if not replayed(line))
            if kept != text:
                self.store.put_text(key, kept)

    def _last_segment(self) -> tuple[str, int]:
        """Where a resumed phase goes on appending: the last segment written before, or a new file."""
        keys = segment_keys(self.store, self.key)
        return (keys[-1], len(self.store.get_bytes(keys[-1]))) if keys else (self.key, 0)

    def _export(self, values: dict) -> None:
        from prometheus_client import Gauge

        for name, value in values.items():
            if not isinstance(value, (int, float)):
                continue
            if name not in _GAUGES:
                _GAUGES[name] = Gauge(f"vibechat_{name}", f"latest {name}", ["phase"])
            _GAUGES[name].labels(phase=self.phase).set(value)


def system_metrics(device) -> dict[str, float]:
    """What a training step's record adds about the machine: host CPU use since the last call (% of all cores) and,
    on CUDA, peak GPU memory (GiB) and the GPU's utilisation (%, through NVML)."""
    values = {"cpu_percent": psutil.cpu_percent(interval=None)}
    if device.type == "cuda":
        import torch

        values["gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        values["gpu_util"] = float(torch.cuda.utilization(device))
    return values


def read_metrics_frame(store, key: str):
    """read_metrics as a pandas DataFrame (a column per field), parsed by Arrow's JSON reader: 200,000 lines in a
    fraction of the time json.loads takes line by line. A file with a corrupt line goes the slow way, line by line."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.json

    data = b"".join(store.get_bytes(k) for k in segment_keys(store, key))
    try:
        return pa.json.read_json(pa.BufferReader(data)).to_pandas(), 0
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # a torn or hand-edited line, or a field changing type
        records, bad = read_metrics(store, key)
        return pd.DataFrame.from_records(records), bad


def read_metrics(store, key: str) -> tuple[list[dict], int]:
    """All records of a metrics file (every segment, in order) and the number of corrupt lines skipped."""
    text = "".join(store.get_text(k) for k in segment_keys(store, key))
    records, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad
