"""The serving benchmark runs its checks and times every concurrency level (the GPU figures in docs/benchmarks.md
come from it)."""

import json
import sys

import pytest

from jobs.bench_serve import main
from vibechat.common import VibechatError


def test_bench_serve_checks_then_times_each_level_against_one_at_a_time_on_cpu(tmp_path, monkeypatch):
    out = tmp_path / "serve.json"
    monkeypatch.setattr(sys, "argv", ["bench_serve", "--depth=1", "--device=cpu", "--vocab-size=256",
                                      "--sequence-len=64", "--prompt-tokens=8", "--new-tokens=4", "--check-streams=3",
                                      "--clients", "1", "3", f"--out={out}"])
    main()
    result = json.loads(out.read_text())
    assert result["greedy_check"]["identical"] == 3 and result["greedy_check"]["argmax_shortfall"] < 1e-4
    rows = result["results"]
    assert [r["clients"] for r in rows] == [1, 3] and result["step_alone_ms"] > 0
    assert all(r["one_at_a_time_tokens_per_s"] > 0 and r["speedup"] > 0 for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--clients", "0"], "--clients: 0 must be at least 1"),
    (["--out=/no/such/folder/serve.json"], "folder /no/such/folder does not exist"),
])
def test_a_zero_count_or_an_unwritable_output_is_one_usage_error(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_serve", "--device=cpu"] + argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_request_longer_than_the_context_is_refused_naming_both(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_serve", "--device=cpu", "--sequence-len=64", "--prompt-tokens=60"])
    with pytest.raises(VibechatError, match="--prompt-tokens 60 \\+ --new-tokens 256 exceed --sequence-len 64"):
        main()
