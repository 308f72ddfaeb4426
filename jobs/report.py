"""Report phase: assemble <base>/report/report.md from the sections the phases logged and the evaluation metrics.

    python -m jobs.report --gpu-hour-cost=2.5

Prints the report's location.
"""

import argparse

from vibechat.common import VibechatError, get_base_dir, run_main
from vibechat.layout import REPORT_DIR, join
from vibechat.report import DEFAULT_GPU_HOUR_COST, Report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-hour-cost", type=float, default=DEFAULT_GPU_HOUR_COST,
                   help=f"dollars per GPU-hour for the cost estimate (default {DEFAULT_GPU_HOUR_COST})")
    args = p.parse_args(argv)
    if not args.gpu_hour_cost >= 0:
        raise VibechatError(f"--gpu-hour-cost {args.gpu_hour_cost} is not a price: give dollars per GPU-hour, >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(Report(join(get_base_dir(), REPORT_DIR)).generate(gpu_hour_cost=args.gpu_hour_cost), flush=True)


if __name__ == "__main__":
    run_main(main)
