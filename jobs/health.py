"""The in-cluster controller's own endpoints: /healthz for the kubelet's probes, /metrics for Prometheus
(runs and phases by state, attempts, phase durations, jobs submitted and adopted, leadership)."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from jobs import pipeline as pl
from vibechat.common import VibechatError

REGISTRY = CollectorRegistry()  # only the controller's own series, not the process collectors' defaults
RUNS = Gauge("vibechat_runs", "Runs in the store, by state", ["state"], registry=REGISTRY)
PHASES = Gauge("vibechat_phases", "Phases of the runs in the store, by state", ["state"], registry=REGISTRY)
ATTEMPTS = Gauge("vibechat_phase_attempt", "Latest attempt of each started phase", ["run", "phase"], registry=REGISTRY)
DURATION = Gauge("vibechat_phase_duration_seconds", "How long each started phase ran, or has run so far",
                 ["run", "phase"], registry=REGISTRY)
SUBMITTED = Counter("vibechat_jobs_submitted", "Phase jobs this controller created", registry=REGISTRY)
ADOPTED = Counter("vibechat_jobs_adopted", "Phase jobs this controller took over, already running", registry=REGISTRY)
LEADER = Gauge("vibechat_leader", "1 while this replica acts (holds the leader Lease)", registry=REGISTRY)


def observe(runs: list[pl.RunState], now: float) -> None:
    """Set the gauges from one pass over the store's runs."""
    for gauge in (RUNS, PHASES, ATTEMPTS, DURATION):
        gauge.clear()
    for state in pl.STATES:  # every state shows, at 0 too, so a query never finds a series missing
        PHASES.labels(state)
        if state != pl.SKIPPED:
            RUNS.labels(state)
    for run in runs:
        RUNS.labels(pl.run_status(run)).inc()
        for name, p in run.phases.items():
            PHASES.labels(p.state).inc()
            if p.started_at is not None:
                ATTEMPTS.labels(run.run_id, name).set(p.attempt)
                DURATION.labels(run.run_id, name).set((p.ended_at or now) - p.started_at)


class Health:
    """Alive while the serve loop passes over the runs at least every `stale_s` seconds (or waits to lead)."""

    def __init__(self, stale_s: float):
        self.stale_s = stale_s
        self.passed_at: float | None = None  # monotonic time of the last pass; None until it leads

    def passed(self) -> None:
        self.passed_at = time.monotonic()
        LEADER.set(1)

    def ok(self) -> bool:
        return self.passed_at is None or time.monotonic() - self.passed_at < self.stale_s


def serve_http(port: int, health: Health) -> ThreadingHTTPServer:
    """Answer /healthz and /metrics on `port` from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/healthz":
                ok = health.ok()
                self._answer(200 if ok else 503, b"ok\n" if ok else b"the serve loop is stuck\n", "text/plain")
            elif self.path == "/metrics":
                self._answer(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            else:
                self._answer(404, b"not found: try /healthz or /metrics\n", "text/plain")

        def _answer(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # the probes would fill the log
            pass

    try:
        server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    except OSError as e:
        raise VibechatError(f"cannot serve /healthz and /metrics on port {port} ({e.strerror}): "
                            "pass another --http-port") from None
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server
