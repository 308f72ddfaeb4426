"""The decode benchmark runs its checks and times every method (the GPU figures in docs/benchmarks.md come from it)."""

import json
import sys

import pytest

from jobs.bench_decode import main

# a model and requests small enough for the CPU, one timed run each
TINY = ["bench_decode", "--depth=1", "--device=cpu", "--vocab-size=256", "--sequence-len=64", "--prompt-tokens=8",
        "--new-tokens=4", "--check-tokens=4", "--runs=1"]


def test_bench_decode_checks_then_times_each_method_on_cpu(tmp_path, monkeypatch):
    out = tmp_path / "decode.json"
    monkeypatch.setattr(sys, "argv", [*TINY, "--batch-sizes", "1", "2", f"--out={out}"])
    main()
    result = json.loads(out.read_text())
    methods = [(r["method"], r["batch_size"]) for r in result["results"]]
    assert methods == [("GPT.generate, full recompute", 1), ("Engine, eager", 1), ("Engine, eager", 2)]
    assert all(r["tokens_per_s"] > 0 for r in result["results"]) and result["argmax_shortfall"] < 1e-4


def test_bench_decode_profile_writes_where_one_requests_time_goes(tmp_path, monkeypatch):
    out = tmp_path / "profile.txt"
    monkeypatch.setattr(sys, "argv", [*TINY, "--batch-sizes", "1", f"--profile={out}"])
    main()
    text = out.read_text()
    assert text.startswith("one request at batch 1:") and "Self CPU" in text


@pytest.mark.parametrize("argv, message", [
    (["--runs=0"], "--runs: 0 must be at least 1"),
    (["--vocab-size=0"], "--vocab-size: 0 must be at least 1"),
    (["--out=/no/such/folder/decode.json"], "folder /no/such/folder does not exist"),
    (["--profile=/no/such/folder/profile.txt"], "folder /no/such/folder does not exist"),
])
def test_a_zero_count_or_an_unwritable_output_is_one_usage_error(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_decode", "--device=cpu"] + argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
