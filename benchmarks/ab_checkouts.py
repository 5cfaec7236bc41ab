"""Paired A/B of two checkouts of dynamo_lite under ``benchmarks.compare_dynamo``, rounds alternating.

    git worktree add ../before <commit>
    python -m benchmarks.ab_checkouts --before ../before --after . --rounds 5 --mode both --lock /tmp/bench.lock

Each round runs ``python -m benchmarks.compare_dynamo --systems dynamo_lite --rounds 1`` once from each checkout
(each with its own code on ``PYTHONPATH``; before first in odd rounds, after first in even ones), so both see the
box's load of the moment (``--lock``: a shared box's lock file, held for one round at a time). Per setup: req/s
and frontend CPU µs/request of every run, their medians, and the median of the per-round after/before ratios.
The runs' JSON goes to the artifact dir; ``--summarize DIR ...`` prints one table over the rounds of earlier
runs (pooled).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("before", "after")


def run_side(checkout: Path, out: Path, args: argparse.Namespace) -> dict:
    """One ``compare_dynamo`` run from ``checkout``; its JSON report."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.compare_dynamo",
        "--systems",
        "dynamo_lite",
        "--setups",
        args.setups,
        "--mode",
        args.mode,
        "--rounds",
        "1",
        "--artifact-dir",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    subprocess.run(cmd, cwd=checkout, env=env, check=True, stdout=subprocess.DEVNULL)
    for data in out.rglob("etcd-data"):  # ~64 MB of preallocated WAL per run; the logs and JSON stay
        shutil.rmtree(data, ignore_errors=True)
    return json.loads((out / "compare_dynamo.json").read_text())


def _listed(runs: list[dict]) -> str:
    return ", ".join(f"{r['req_s']:.0f}" for r in runs)


@contextlib.contextmanager
def _held(lock: str) -> Iterator[None]:
    """``flock(1)`` on ``lock`` (nothing when empty): a box shared with other benchmarks takes turns per round."""
    if not lock:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_rounds(art: Path) -> dict[tuple[str, str], list[dict]]:
    """(setup, side) → the metrics of each round under ``art`` (``r<N>-<side>/compare_dynamo.json``), in
    round order."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for side in SIDES:
        found = sorted(
            art.glob(f"r*-{side}/compare_dynamo.json"), key=lambda f: int(f.parent.name[1:].split("-")[0])
        )
        for path in found:
            for run in json.loads(path.read_text())["runs"]:
                runs.setdefault((run["setup"], side), []).append({**run["metrics"], "errors": run["errors"]})
    return runs


def table(runs: dict[tuple[str, str], list[dict]]) -> str:
    """Per setup: every round's req/s, the medians, the median per-round ratio, frontend CPU per request."""
    lines = [
        "| setup | req/s before | req/s after | median ratio | FE CPU µs/req before → after (medians) |",
        "|---|---|---|---|---|",
    ]
    for setup in dict.fromkeys(s for s, _ in runs):
        b, a = runs[(setup, "before")], runs[(setup, "after")]
        ratios = [y["req_s"] / x["req_s"] for x, y in zip(b, a, strict=True)]
        req = [statistics.median(r["req_s"] for r in rs) for rs in (b, a)]
        cpu = [statistics.median(r["frontend_cpu_us_per_req"] for r in rs) for rs in (b, a)]
        lines.append(
            f"| {setup} ({len(ratios)} rounds) | {_listed(b)} → **{req[0]:.0f}** | {_listed(a)} → **{req[1]:.0f}** "
            f"| **{statistics.median(ratios):.2f}** | {cpu[0]:.0f} → {cpu[1]:.0f} "
            f"({100 * (cpu[1] / cpu[0] - 1):+.0f} %) |"
        )
    errors = sum(r["errors"] for rs in runs.values() for r in rs)
    return "\n".join(lines) + f"\n\nerrors in all runs: {errors}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.ab_checkouts", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--before", help="checkout of the baseline (a git worktree)")
    p.add_argument("--after", default=str(ROOT), help="checkout of the change (default: this one)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--setups", default="disagg")
    p.add_argument("--mode", default="both", choices=("default", "per-token", "both"))
    p.add_argument("--lock", default="", help="a file to flock around each round (a shared box's turn)")
    p.add_argument("--artifact-dir", default="", help="default: artifacts/ab_checkouts-<timestamp>")
    p.add_argument(
        "--summarize",
        nargs="+",
        default=[],
        help="run nothing: one table over the rounds of these artifact dirs",
    )
    args = p.parse_args(argv)
    if args.summarize:
        pooled: dict[tuple[str, str], list[dict]] = {}
        for art in args.summarize:
            for key, rounds in load_rounds(Path(art)).items():
                pooled.setdefault(key, []).extend(rounds)
        print(table(pooled))
        return 0
    if not args.before:
        p.error("--before is required (or --summarize)")
    dirs = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    art = Path(args.artifact_dir or ROOT / "artifacts" / f"ab_checkouts-{stamp}").resolve()
    for rnd in range(1, args.rounds + 1):
        with _held(args.lock):
            order = SIDES if rnd % 2 else SIDES[::-1]  # ABBA: neither side always runs first after a wait
            reports = {side: run_side(dirs[side], art / f"r{rnd}-{side}", args) for side in order}
        for side, report in sorted(reports.items(), key=lambda kv: SIDES.index(kv[0])):
            for run in report["runs"]:
                m = run["metrics"]
                print(
                    f"round {rnd} {side:6} {run['setup']:18} {m['req_s']:6.0f} req/s  "
                    f"FE {m['frontend_cpu_us_per_req']:5.0f} µs/req  errors {run['errors']}  "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
    print("\n" + table(load_rounds(art)) + f"; JSON under {art}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
