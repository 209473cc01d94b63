"""`make bench`: run every benchmarks/bench_*.py (or the ones named) in its own process, one after another.

Each benchmark runs in a fresh interpreter so that TensorFlow/Spark state and peak memory of one
does not colour the next. Usage: ``python -m benchmarks [preprocess network ...]``.
"""

import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def main(argv=None) -> int:
    names = list(argv if argv is not None else sys.argv[1:])
    available = sorted(p.stem[len("bench_") :] for p in HERE.glob("bench_*.py"))
    unknown = [n for n in names if n not in available]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", TF_CPP_MIN_LOG_LEVEL="2")
    failed = []
    for name in names or available:
        print(f"\n=== benchmark: {name} ===", flush=True)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.bench_{name}"], cwd=HERE.parent, env=env)
        print(
            f"=== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - start:.0f} s ===",
            flush=True,
        )
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed benchmarks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
