"""python -m report reset            # start a run: clear the old report, record date, code, hardware, software
python -m report generate [-o report.md] [--gpu-hour-cost 3.0]   # write report.md (+ plots) from what the stages logged
"""

from __future__ import annotations

import argparse
from pathlib import Path

from report import get_report
from report.header import collect_header
from report.markdown import DEFAULT_GPU_HOUR_COST, generate


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m report", description="nanochat's report card")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("reset", help="start a new run: clear the previous report and write the run header")
    gen = commands.add_parser("generate", help="write report.md in the current directory")
    gen.add_argument("-o", "--output", type=Path, default=Path("report.md"), help="where to write the markdown")
    gen.add_argument("--gpu-hour-cost", type=float, default=DEFAULT_GPU_HOUR_COST,
                     help="price of one GPU for one hour in dollars, for the cost estimate (8xH100 ~ $24/h -> 3.0)")
    args = parser.parse_args()

    report = get_report()
    if args.command == "reset":
        path = report.reset(collect_header())
        print(f"report reset: run header written to {path}")
        return
    if args.gpu_hour_cost < 0:
        parser.error(f"--gpu-hour-cost must be >= 0, got {args.gpu_hour_cost}")
    path = generate(report, args.output, gpu_hour_cost=args.gpu_hour_cost)
    print(f"report written to {path.resolve()}")


if __name__ == "__main__":
    main()
