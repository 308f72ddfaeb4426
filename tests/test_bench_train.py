"""The training benchmark runs (the GPU figures in docs/benchmarks.md come from this script)."""

import json

import pytest

from jobs.bench_train import main


def test_bench_train_reports_throughput_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    main(["--depth=1", "--max-seq-len=32", "--device-batch-size=2", "--vocab-size=256", "--steps=1", "--warmup=1",
          "--compile=off", "--device=cpu", f"--out={out}"])
    result = json.loads(out.read_text())
    assert result["tok_per_sec"] > 0 and result["mfu"] is None and result["tokens_per_step"] == 64


def test_bench_train_profile_splits_step_into_forward_backward_and_optimizer(tmp_path):
    out = tmp_path / "profile.txt"
    main(["--depth=1", "--max-seq-len=32", "--device-batch-size=2", "--vocab-size=256", "--steps=1", "--warmup=0",
          "--compile=off", "--device=cpu", "--total-batch-size=128", f"--profile={out}"])
    text = out.read_text()
    assert "2 x forward+backward" in text and "optimizer step" in text


def test_kernel_kind_sorts_h100_kernel_names():
    from jobs.bench_train import kernel_kind

    assert kernel_kind("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>") == "attention"
    assert kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kernel_kind("triton_per_fused__to_copy_mul_rsqrt_0").startswith("fused elementwise")
    assert kernel_kind("_softcap_ce_bwd").startswith("fused elementwise")  # vibechat.train_ops' own kernels
    assert kernel_kind("_rotary_norm_fwd").startswith("fused elementwise")
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4>") == "other"


@pytest.mark.parametrize("argv, message", [
    (["--device-batch-size=0"], "--device-batch-size: 0 must be at least 1"),
    (["--steps=0"], "--steps: 0 must be at least 1"),
    (["--warmup=-1"], "--warmup: -1 must be at least 0"),
    (["--vocab-size=0"], "--vocab-size: 0 must be at least 1"),
    (["--profile=/no/such/folder/profile.txt"], "folder /no/such/folder does not exist"),
])
def test_bad_arguments_are_one_usage_error_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device=cpu"] + argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_total_batch_that_is_not_a_multiple_of_the_micro_batch_is_refused():
    from vibechat.common import VibechatError

    with pytest.raises(VibechatError, match="--total-batch-size 100 is not a multiple"):
        main(["--depth=1", "--max-seq-len=32", "--device-batch-size=2", "--vocab-size=256", "--steps=1",
              "--compile=off", "--device=cpu", "--total-batch-size=100"])


def test_an_unknown_device_is_one_clear_error():
    from vibechat.common import VibechatError

    with pytest.raises(VibechatError, match="unknown device 'nope'.*use cuda, cpu or mps"):
        main(["--depth=1", "--max-seq-len=32", "--device-batch-size=2", "--vocab-size=256", "--steps=1",
              "--device=nope"])


def test_fp8_on_a_cpu_is_one_clear_error_not_a_fallback():
    from vibechat.common import VibechatError

    with pytest.raises(VibechatError, match="--fp8 needs an NVIDIA GPU with FP8 matmuls.*this run is on cpu"):
        main(["--depth=1", "--max-seq-len=32", "--device-batch-size=2", "--vocab-size=256", "--steps=1",
              "--compile=off", "--device=cpu", "--fp8"])
