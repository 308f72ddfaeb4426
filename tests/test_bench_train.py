"""The training benchmark runs (the GPU figures in docs/benchmarks.md come from this script)."""

import json

from jobs.bench_train import main


def test_bench_train_reports_throughput_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    main(["--depth=1", "--max-seq-len=32", "--device-batch-size=2", "--vocab-size=256", "--steps=1", "--warmup=1",
          "--compile=off", "--device=cpu", f"--out={out}"])
    result = json.loads(out.read_text())
    assert result["tok_per_sec"] > 0 and result["mfu"] is None and result["tokens_per_step"] == 64
