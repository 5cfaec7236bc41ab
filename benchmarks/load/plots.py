"""PNG plots with matplotlib when it is installed (`pip install matplotlib`); skipped with a note if not."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import BenchmarkResult

LATENCY_CDF_PNG = "latency_cdf.png"
SWEEP_THROUGHPUT_PNG = "sweep_throughput.png"
SWEEP_LATENCY_PNG = "sweep_latency.png"
_NO_MATPLOTLIB = "matplotlib is not installed: plots skipped (pip install matplotlib)"


def _pyplot() -> Any | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(result: BenchmarkResult, folder: Path) -> tuple[list[Path], str | None]:
    """CDFs of TTFT, ITL, request latency and inter-chunk gaps → latency_cdf.png."""
    plt = _pyplot()
    if plt is None:
        return [], _NO_MATPLOTLIB
    ok = [r for r in result.records if r.ok]
    panels = {
        "Time to first token (ms)": [r.ttft * 1e3 for r in ok if r.ttft is not None],
        "Inter-token latency (ms)": [r.itl * 1e3 for r in ok if r.itl is not None],
        "Request latency (ms)": [r.latency * 1e3 for r in ok],
        "Inter-chunk gap (ms)": [g * 1e3 for r in ok for g in r.chunk_gaps],
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, values) in zip(axes.flat, panels.items(), strict=True):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if not values:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        values.sort()
        n = len(values)
        ax.step(values, [(i + 1) / n for i in range(n)], where="post")
        ax.set_ylabel("fraction of samples")
        ax.set_ylim(0, 1.01)
    fig.suptitle(_title(result), fontsize=9)
    fig.tight_layout()
    path = folder / LATENCY_CDF_PNG
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path], None


def _title(result: BenchmarkResult) -> str:
    from .report import describe

    return describe(result)


def plot_sweep(results: Sequence[BenchmarkResult], folder: Path) -> tuple[list[Path], str | None]:
    """Throughput and latency vs concurrency → sweep_throughput.png, sweep_latency.png."""
    plt = _pyplot()
    if plt is None:
        return [], _NO_MATPLOTLIB
    if not results:
        return [], None
    conc = [r.config.concurrency for r in results]
    s = [r.summary for r in results]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(conc, [x.request_throughput for x in s], "o-", color="tab:blue", label="requests/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel("concurrency")
    ax.set_ylabel("requests/s", color="tab:blue")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(conc, [x.output_token_throughput for x in s], "s--", color="tab:orange", label="output tokens/s")
    ax2.set_ylabel("output tokens/s", color="tab:orange")
    ax.set_title("Throughput vs concurrency")
    fig.tight_layout()
    throughput = folder / SWEEP_THROUGHPUT_PNG
    fig.savefig(throughput, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title in (
        (axes[0], "time_to_first_token_ms", "Time to first token (ms)"),
        (axes[1], "inter_token_latency_ms", "Inter-token latency (ms)"),
    ):
        for q, style in (("p50", "o-"), ("p90", "^:"), ("p99", "s--")):
            ys = [getattr(x.metrics[key], q) if key in x.metrics else float("nan") for x in s]
            ax.plot(conc, ys, style, label=q)
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    latency = folder / SWEEP_LATENCY_PNG
    fig.savefig(latency, dpi=110)
    plt.close(fig)
    return [throughput, latency], None
