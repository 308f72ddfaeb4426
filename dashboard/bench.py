"""Time to the first chart of the Metrics page on a long run, in a real browser.

    python -m dashboard.bench [--lines 200000] [--repeats 3]

Writes a run whose base phase logged --lines steps (through MetricsLogger, so in segments as a real run
leaves them), then for each repeat starts a fresh dashboard (nothing cached), opens /metrics in chromium and
times from the request to the first drawn chart; prints every time and the median.
"""

import argparse
import json
import math
import os
import random
import statistics
import tempfile
import time

from dashboard.browser import launch, serve
from jobs import pipeline
from jobs.config import load_config
from jobs.runstore import write_run
from vibechat.layout import in_run, metrics_key
from vibechat.metrics import SEGMENT_BYTES
from vibechat.storage import open_store


def write_long_run(store_url: str, run_id: str, lines: int) -> None:
    """runs/<run_id>: a run.json and metrics/base.jsonl of `lines` steps shaped like base training's."""
    store = open_store(store_url)
    rng = random.Random(0)
    segment, chunk, size = 0, [], 0
    for step in range(1, lines + 1):
        line = json.dumps({"time": 1.7e9 + step, "phase": "base", "step": step,
                           "loss": 5 * math.exp(-step / (lines / 10)) + 2.2 + rng.gauss(0, 0.05),
                           "lr": 1.0, "tok_per_sec": 40000 + rng.gauss(0, 500), "mfu": 0.3 + rng.gauss(0, 0.01),
                           "tokens": step * 524288}) + "\n"
        if size + len(line) > SEGMENT_BYTES:  # the segments MetricsLogger would have written
            store.put_text(_segment_key(run_id, segment), "".join(chunk))
            segment, chunk, size = segment + 1, [], 0
        chunk.append(line)
        size += len(line)
    store.put_text(_segment_key(run_id, segment), "".join(chunk))
    write_run(store, pipeline.new_run(run_id, "tiny", load_config("tiny"), "local", time.time()), None)


def _segment_key(run_id: str, number: int) -> str:
    return in_run(run_id, metrics_key("base")) + (f".{number:06d}" if number else "")


def time_first_chart(store_url: str, log_path: str) -> float:
    from playwright.sync_api import sync_playwright

    with serve(store_url, log_path) as url, sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)  # the first script run imports the app's modules: not the Metrics page's time
        page.get_by_role("heading", name="Runs").wait_for(timeout=60_000)
        start = time.perf_counter()
        page.goto(f"{url}/metrics")
        page.get_by_test_id("stVegaLiteChart").first.locator("canvas, svg").first.wait_for(timeout=60_000)
        took = time.perf_counter() - start
        browser.close()
    return took


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dashboard.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=200_000, help="metrics lines of the run (default 200000)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh dashboards to time (default 3)")
    args = parser.parse_args(argv)
    if args.lines < 1 or args.repeats < 1:
        parser.error("--lines and --repeats must be at least 1")
    with tempfile.TemporaryDirectory() as root:
        store = os.path.join(root, "store")
        write_long_run(store, "long", args.lines)
        times = [time_first_chart(store, os.path.join(root, "streamlit.log")) for _ in range(args.repeats)]
    print(f"first chart of /metrics, {args.lines} lines: " + ", ".join(f"{t:.2f}s" for t in times)
          + f"; median {statistics.median(times):.2f}s")


if __name__ == "__main__":
    main()
