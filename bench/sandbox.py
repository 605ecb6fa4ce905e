"""Per-call latency of the python tool's sandbox: `print(2+2)` through execute_code, p50 and p95.

    python -m bench.sandbox                 # 200 calls each way
    python -m bench.sandbox --calls 1000

Side by side in one run, alternating rounds: the kernel-confined path (the pre-confined worker forks a child per
call; nanochat/execution.py) and the one-interpreter-per-call path (the weak fallback, which is how every call ran
before the worker existed). The first confined call, which starts the worker, is reported on its own.
"""

from __future__ import annotations

import argparse
import statistics
import time

from nanochat import execution
from nanochat.kernels import describe_machine


def time_calls(run, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
        if result.stdout != "4\n":
            raise SystemExit(f"the sandbox answered {result.stdout!r} / {result.error!r} instead of 4")
    return times


def percentile(times: list[float], q: float) -> float:
    return statistics.quantiles(times, n=100, method="inclusive")[q - 1] if len(times) > 1 else times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per path (split into 4 alternating rounds)")
    args = parser.parse_args()
    if args.calls < 4:
        parser.error("--calls must be >= 4")
    print(describe_machine())
    status = execution.confinement()  # probes by running a program: starts the worker where it can
    limits = execution._limits(5.0, 256 * 1024**2)
    confined = lambda: execution._run_confined("print(2+2)", limits, 1024)
    weak = lambda: execution._run_weak("print(2+2)", limits, 1024)
    if not status.strong:
        print(f"kernel confinement unavailable ({status.reason}): only the per-interpreter path is measured")
    execution._shutdown_worker()  # so that the next call starts a fresh one, timed
    start = time.perf_counter()
    if status.strong:
        confined()
        print(f"first confined call (starts the worker): {(time.perf_counter() - start) * 1000:.1f} ms")
    samples = {"confined (worker forks a child)": [], "one interpreter per call": []}
    for _ in range(4):
        if status.strong:
            samples["confined (worker forks a child)"] += time_calls(confined, args.calls // 4)
        samples["one interpreter per call"] += time_calls(weak, args.calls // 4)
    medians = {}
    for name, times in samples.items():
        if times:
            medians[name] = statistics.median(times)
            print(f"{name:>34}: p50 {medians[name] * 1000:6.1f} ms  p95 {percentile(times, 95) * 1000:6.1f} ms  "
                  f"({len(times)} calls)")
    if len(medians) == 2:
        ratio = medians["one interpreter per call"] / medians["confined (worker forks a child)"]
        print(f"p50 ratio, per-interpreter / confined: {ratio:.1f}x")


if __name__ == "__main__":
    main()
