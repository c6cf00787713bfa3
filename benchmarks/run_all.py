"""Run every ``benchmarks/bench_*.py`` in turn (``make bench``).

Each benchmark runs in its own Python process (so one's memory or thread settings cannot leak
into the next), with this interpreter and the repository root as working directory, and writes
its own JSON under ``benchmarks/results/``. Extra arguments (e.g. ``--quick``) are passed to every
benchmark; ``-k NAME`` runs only the benchmarks whose file name contains NAME.

The exit status is non-zero when any benchmark failed; a summary of wall times is printed last.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run every benchmarks/bench_*.py in turn.")
    ap.add_argument("-k", dest="select", default="", help="run only files whose name contains this")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark")
    args, passthrough = ap.parse_known_args(argv)
    files = sorted(p for p in HERE.glob("bench_*.py") if args.select in p.name)
    if not files:
        print(f"no benchmarks match {args.select!r} in {HERE}")
        return 1
    (HERE / "results").mkdir(exist_ok=True)
    summary = []
    for path in files:
        print(f"=== {path.name} {' '.join(passthrough)}".rstrip(), flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run([sys.executable, str(path), *passthrough], cwd=ROOT,
                                timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        summary.append((path.name, rc, time.perf_counter() - t0))
    print("\n=== summary")
    for name, rc, dt in summary:
        status = "ok" if rc == 0 else f"FAILED ({rc})"
        print(f"  {name:40s} {dt:8.1f} s  {status}")
    return 0 if all(rc == 0 for _, rc, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
