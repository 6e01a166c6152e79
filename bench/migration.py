"""N live migrations under the 1 kHz probe on a real lab: downtime beyond the pause and
convergence (step 2 seen → flows acked on every chassis), p50/p99/max.

    .venv/bin/python bench/migration.py --migrations 20 [--store etcd] [--pause-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
from pathlib import Path

from rich.console import Console

from ferry.demo import run_demo, summary


def pct(values: list[float], q: float) -> float:
    vs = sorted(values)
    return vs[min(len(vs) - 1, max(0, math.ceil(q * len(vs)) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--migrations", type=int, default=20)
    ap.add_argument("--store", choices=["memory", "etcd"], default="memory")
    ap.add_argument("--chassis", type=int, default=3)
    ap.add_argument("--pause-ms", type=float, default=50.0)
    ap.add_argument("--unplug-delay-ms", type=float, default=100.0)
    ap.add_argument("--rate-hz", type=float, default=1000.0)
    ap.add_argument("--out", type=Path, default=Path("out/bench-migration"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run_demo(a.chassis, a.store, a.migrations, a.pause_ms,
                                   a.unplug_delay_ms, a.rate_hz, a.out))
    console = Console()
    console.print(summary(results, f"store {a.store}"))
    figures = {}
    for name, values in (
        ("downtime beyond the pause (ms)", [r.beyond_pause_ms for r in results]),
        ("convergence, step 2 seen → every chassis acked (ms)", [r.converged_ms
                                                                  for r in results]),
    ):
        vs = [v for v in values if v is not None]
        if vs:
            figures[name] = {"p50": pct(vs, 0.5), "p99": pct(vs, 0.99), "max": max(vs),
                             "n": len(vs)}
            console.print(f"{name}: p50 {pct(vs, 0.5):.1f}  p99 {pct(vs, 0.99):.1f}  "
                          f"max {max(vs):.1f}  (n={len(vs)})", highlight=False)
    lost = sum(r.lost for r in results)
    dup = sum(r.duplicated for r in results)
    reord = sum(r.reordered for r in results)
    console.print(f"packets lost {lost}, duplicated {dup}, reordered {reord} "
                  f"(all clients, all migrations)", highlight=False)
    (a.out / "bench.json").write_text(json.dumps({"args": {k: str(v) for k, v in
                                                           vars(a).items()},
                                                  "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
