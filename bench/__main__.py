"""``python -m bench [BENCH ...] [--quick] [--json PATH]``, BENCH of overhead, leak, control,
launch, restart, fleet, orchestrate.

Runs the chosen benchmarks (all by default) one after the other, never two at once (they
would measure each other), prints the table and writes the JSON. A benchmark that fails is
reported as failed and the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench.common import (
    DEFAULT_JSON,
    BenchResult,
    loadavg,
    log,
    machine_info,
    table,
    write_json,
)

BENCHES = ("overhead", "leak", "control", "launch", "restart", "fleet", "orchestrate")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "benches", nargs="*", metavar="BENCH", help=f"of {', '.join(BENCHES)}; default: all"
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run (~1 min)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default: {DEFAULT_JSON}")
    args = p.parse_args(argv)
    unknown = sorted(set(args.benches) - set(BENCHES))
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    chosen = [name for name in BENCHES if name in args.benches] or list(BENCHES)
    started = datetime.now(UTC)
    t0 = time.monotonic()
    results: list[BenchResult] = []
    for name in chosen:
        log(f"{name}: starting{' (quick)' if args.quick else ''}")
        t_bench, load = time.monotonic(), loadavg()
        module = importlib.import_module(f"bench.{name}")
        try:
            result: BenchResult = module.run(quick=args.quick)
        except Exception as exc:
            traceback.print_exc()
            result = BenchResult(name, error=f"{type(exc).__name__}: {exc}")
        result.duration_s = time.monotonic() - t_bench
        result.details["loadavg_before"] = load
        log(f"{name}: done in {result.duration_s:.0f} s")
        results.append(result)
    payload = {
        "schema": 1,
        "started_at": started.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "duration_s": round(time.monotonic() - t0, 1),
        "quick": args.quick,
        "machine": machine_info(),
        "benchmarks": {r.name: r.as_dict() for r in results},
        "figures": [f.as_dict() for r in results for f in r.figures],
    }
    write_json(args.json, payload)
    print(table(results))
    for result in results:
        for note in result.notes:
            print(f"- {result.name}: {note}")
    print(f"\nJSON: {args.json}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
