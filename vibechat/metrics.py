"""Training metrics: rank 0 appends one JSON object per logged step to <base>/metrics/<phase>.jsonl
and, when VIBECHAT_METRICS_PORT is set, serves the latest values for Prometheus."""

import json
import os
import time

from vibechat.common import get_base_dir, get_dist_info
from vibechat.storage import open_store

_GAUGES = {}  # name -> Gauge, per process: prometheus refuses a second gauge of the same name


class MetricsLogger:
    """log(step=..., loss=...) appends a line; rank != 0 does nothing."""

    def __init__(self, phase: str, base_dir: str | None = None):
        self.phase = phase
        _, rank, _, _ = get_dist_info()
        self.enabled = rank == 0
        self.store = open_store(base_dir or get_base_dir())
        self.key = f"metrics/{phase}.jsonl"
        port = os.environ.get("VIBECHAT_METRICS_PORT")
        if self.enabled and port:
            from prometheus_client import start_http_server

            start_http_server(int(port))

    def log(self, **values) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), "phase": self.phase, **values}
        self.store.append_text(self.key, json.dumps(record) + "\n")
        self._export(values)

    def _export(self, values: dict) -> None:
        from prometheus_client import Gauge

        for name, value in values.items():
            if not isinstance(value, (int, float)):
                continue
            if name not in _GAUGES:
                _GAUGES[name] = Gauge(f"vibechat_{name}", f"latest {name}", ["phase"])
            _GAUGES[name].labels(phase=self.phase).set(value)


def read_metrics(store, key: str) -> tuple[list[dict], int]:
    """All records of a metrics file and the number of corrupt lines skipped."""
    try:
        text = store.get_text(key)
    except FileNotFoundError:
        return [], 0
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
