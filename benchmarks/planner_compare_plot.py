"""An SVG of a ``benchmarks.planner_compare`` output (no plotting library needed): left, goodput per
worker-second per configuration (each round a dot, the median a bar); right, the planner's prefill and decode
workers over the trace in each round, under the trace's request rate. ``--table`` prints the README's table.

    python -m benchmarks.planner_compare_plot out.json benchmarks/planner_compare.svg --table
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from xml.sax.saxutils import escape

from benchmarks.load_trace import day_trace

W, H = 960, 380
LEFT = (70, 40, 330, 300)  # x, y, width, height of the bar panel
RIGHT = (480, 40, 440, 300)
ROUND_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")


def _text(x: float, y: float, s: str, size: int = 12, anchor: str = "middle", **extra: str) -> str:
    attrs = " ".join(f'{k.replace("_", "-")}="{v}"' for k, v in extra.items())
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
        f'font-family="sans-serif" {attrs}>{escape(s)}</text>'
    )


def _axis_ticks(top: float) -> list[float]:
    step = next(s for s in (0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5) if top / s <= 6)
    return [i * step for i in range(int(top / step) + 1)]


def render(data: dict) -> str:
    runs = data["runs"]
    configs = list(dict.fromkeys(r["config"] for r in runs))
    rounds = sorted({r.get("round", 0) for r in runs})
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}">']
    out.append(f'<rect width="{W}" height="{H}" fill="white"/>')

    # left: good requests per worker-second
    x0, y0, w, h = LEFT
    top = max(r["goodput_per_worker_s"] for r in runs) * 1.15 or 1.0
    out.append(_text(x0 + w / 2, 20, "good requests per worker-second", 14, font_weight="bold"))
    for v in _axis_ticks(top):
        y = y0 + h - v / top * h
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(_text(x0 - 6, y + 4, f"{v:g}", 11, "end"))
    slot = w / len(configs)
    for i, name in enumerate(configs):
        vals = [r["goodput_per_worker_s"] for r in runs if r["config"] == name]
        cx = x0 + slot * (i + 0.5)
        med = statistics.median(vals)
        colour = "#d62728" if name == "planner" else "#7f7f7f"
        y = y0 + h - med / top * h
        out.append(
            f'<rect x="{cx - slot * 0.3:.1f}" y="{y:.1f}" width="{slot * 0.6:.1f}" height="{y0 + h - y:.1f}" '
            f'fill="{colour}" fill-opacity="0.35"/>'
        )
        out.append(_text(cx, y - 5, f"{med:.3f}", 11))
        for r in runs:
            if r["config"] == name:
                k = rounds.index(r.get("round", 0))
                ry = y0 + h - r["goodput_per_worker_s"] / top * h
                dx = (k - (len(rounds) - 1) / 2) * 8
                out.append(
                    f'<circle cx="{cx + dx:.1f}" cy="{ry:.1f}" r="3.5" '
                    f'fill="{ROUND_COLOURS[k % len(ROUND_COLOURS)]}"/>'
                )
        out.append(_text(cx, y0 + h + 16, name, 11))
    out.append(f'<line x1="{x0}" y1="{y0 + h}" x2="{x0 + w}" y2="{y0 + h}" stroke="black"/>')
    for k, rnd in enumerate(rounds):
        out.append(
            f'<circle cx="{x0 + 10 + 70 * k}" cy="{y0 + h + 36}" r="3.5" '
            f'fill="{ROUND_COLOURS[k % len(ROUND_COLOURS)]}"/>'
        )
        out.append(_text(x0 + 18 + 70 * k, y0 + h + 40, f"round {rnd + 1}", 11, "start"))

    # right: the planner's workers over the trace, and the trace's rate
    x0, y0, w, h = RIGHT
    args = data["args"]
    dur = args["duration_s"]
    out.append(_text(x0 + w / 2, 20, "planner: workers over the trace (rate dashed)", 14, font_weight="bold"))
    max_workers = 4
    for n in range(max_workers + 1):
        y = y0 + h - n / max_workers * h
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + w}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(_text(x0 - 6, y + 4, str(n), 11, "end"))
    for t in range(0, int(dur) + 1, 100 if dur > 300 else 30):
        x = x0 + t / dur * w
        out.append(_text(x, y0 + h + 16, f"{t} s", 11))
    trace = day_trace(dur, args["peak_rate"], args["night_rate"], (args["isl_short"], args["isl_long"]))
    peak = args["peak_rate"]
    pts = " ".join(f"{x0 + p.t / dur * w:.1f},{y0 + h - p.rate / peak * h * 0.75:.1f}" for p in trace.points)
    out.append(f'<polyline points="{pts}" fill="none" stroke="black" stroke-dasharray="5,4"/>')
    out.append(_text(x0 + w - 4, y0 + h - h * 0.75 - 6, f"{peak:g} req/s", 11, "end"))
    long_from = next(p.t for p in trace.points if p.isl == trace.points[-1].isl)
    out.append(_text(x0 + long_from / dur * w, y0 + 12, f"ISL → {args['isl_long']}", 11))
    for r in runs:
        if r["config"] != "planner" or not r.get("timeline"):
            continue
        k = rounds.index(r.get("round", 0))
        colour = ROUND_COLOURS[k % len(ROUND_COLOURS)]
        for idx, dash in ((1, ' stroke-dasharray="2,2"'), (2, "")):
            steps, last = [], None
            for t, *counts in r["timeline"]:
                n = counts[idx - 1]
                x = x0 + min(t, dur) / dur * w
                y = y0 + h - n / max_workers * h - (idx - 1.5) * 3  # prefill and decode apart by 3 px
                if last is not None:
                    steps.append(f"{x:.1f},{last:.1f}")
                steps.append(f"{x:.1f},{y:.1f}")
                last = y
            out.append(
                f'<polyline points="{" ".join(steps)}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>'
            )
    out.append(f'<line x1="{x0}" y1="{y0 + h}" x2="{x0 + w}" y2="{y0 + h}" stroke="black"/>')
    out.append(_text(x0 + 10, y0 + h + 36, "solid: decode workers, dotted: prefill workers", 11, "start"))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def table(data: dict) -> str:
    """Markdown: per configuration the median over rounds, then each round."""
    runs = data["runs"]
    configs = list(dict.fromkeys(r["config"] for r in runs))
    head = (
        "| configuration | round | requests | failed | good | TTFT p90 | ITL p90 | worker-s | good / worker-s "
        "| box CPU busy (peak 30 s) | load avg | this benchmark's CPU |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def cells(r: dict) -> list[str]:
        return [
            f"{r['requests']:.0f}",
            f"{r['failed']:.0f}",
            f"{r['good']:.0f}",
            f"{r['ttft_p90_s'] * 1000:.0f} ms",
            f"{r['itl_p90_s'] * 1000:.0f} ms",
            f"{r['worker_seconds']:.0f}",
            f"{r['goodput_per_worker_s']:.3f}",
            f"{r['box_cpu_busy']:.0%} ({r['box_cpu_busy_peak']:.0%})",
            f"{r['load_avg_mean']:.1f}",
            f"{r['stack_cpu_busy']:.0%} ({r['stack_cpu_busy_peak']:.0%})",
        ]

    for name in configs:
        mine = sorted((r for r in runs if r["config"] == name), key=lambda r: r.get("round", 0))
        med = {
            k: statistics.median(r[k] for r in mine)
            for k in mine[0]
            if isinstance(mine[0][k], int | float) and not isinstance(mine[0][k], bool)
        }
        bold = [f"**{c}**" if i == 6 else c for i, c in enumerate(cells(med))]
        lines.append(f"| **{name}** | median of {len(mine)} | " + " | ".join(bold) + " |")
        for r in mine:
            lines.append(f"| | {r.get('round', 0) + 1} | " + " | ".join(cells(r)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.planner_compare_plot", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--table", action="store_true", help="also print the README's markdown table")
    args = p.parse_args(argv)
    data = json.loads(Path(args.input).read_text())
    Path(args.output).write_text(render(data))
    if args.table:
        print(table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
