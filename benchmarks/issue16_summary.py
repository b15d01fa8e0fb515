"""Per-cell ranges of one folder of `ntk_speed.py` runs (as `issue16_cells.sh` writes).

For each run's JSON and each cell: neural-tangents' best (which implementation,
seconds), ntkd's range over its entry points (without the `jacobian` and `ntvp`
baselines), the speed-up range with the slowest and fastest entry named, and
each `auto` row (flagged where the benchmark's auto / best reading exceeds 1.10).

    python benchmarks/issue16_summary.py benchmarks/ntk_speed_runs/2026-12-03-s8
"""

import glob
import json
import os
import sys

FOLDER = sys.argv[1] if len(sys.argv) > 1 else "."
for path in sorted(glob.glob(os.path.join(FOLDER, "*.json"))):
    name = os.path.basename(path)[:-5]
    d = json.load(open(path))
    if not isinstance(d, dict) or "peak_gflops" not in d:  # not an ntk_speed.py run
        continue
    print(f"== {name}: peak {d['peak_gflops']:.1f} GFLOP/s ({d['cpu']})")
    cells = {}
    for r in d["generic"]:
        cells.setdefault((r["workload"], r["n"], r["mode"]), []).append((r["entry"], r["seconds"]))
    for r in d["rows"]:
        cells.setdefault((r["workload"], r["n"], r["mode"]), []).append(
            (r["contender"], r["seconds"])
        )
    for (w, n, mode), entries in cells.items():
        nt = [(s, e) for e, s in entries if e.startswith("nt-")]
        if not nt:
            continue
        nt_s, nt_e = min(nt)
        ours = [
            (s, e)
            for e, s in entries
            if not e.startswith(("nt-", "naive"))
            and e not in ("plain jacobian", "plain ntvp", "ntkd-jacobian", "ntkd-ntvp")
        ]
        lo, hi = min(ours), max(ours)
        print(
            f"  {w} {n} {mode}: NT {nt_e} {nt_s:.4f}s; ntkd {lo[0]:.4f}-{hi[0]:.4f}s; "
            f"{nt_s / hi[0]:.2f} ({hi[1]})-{nt_s / lo[0]:.2f}x ({lo[1]})"
        )
    for a in d.get("auto", []):
        flag = "  <-- over 1.10" if a["auto_vs_best"] > 1.10 else ""
        pv = a["picked_vs_best"]
        print(
            f"  auto {a['workload']} {a['n']} {a['mode']}: picked {a['picked']}, best "
            f"{a['best_fixed']}, auto/best {a['auto_vs_best']:.2f}, picked/best "
            f"{'-' if pv is None else f'{pv:.2f}'}{flag}"
        )
