"""benchmarks.ab_checkouts reads rounds back from its artifact dirs and pools them into one table."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.ab_checkouts import load_rounds, main, table


def _write(art: Path, rnd: int, side: str, req_s: float, cpu_us: float) -> None:
    run_dir = art / f"r{rnd}-{side}"
    run_dir.mkdir(parents=True)
    metrics = {"req_s": req_s, "frontend_cpu_us_per_req": cpu_us}
    report = {"runs": [{"setup": "disagg", "metrics": metrics, "errors": 0}]}
    (run_dir / "compare_dynamo.json").write_text(json.dumps(report))


def test_rounds_in_round_order_and_the_median_of_paired_ratios(tmp_path: Path) -> None:
    for rnd, (before, after) in enumerate([(100, 150), (200, 100), (100, 120), (100, 90), (100, 80)], 1):
        _write(tmp_path, rnd, "before", before, 1000)
        _write(tmp_path, rnd, "after", after, 900)
    runs = load_rounds(tmp_path)
    assert [r["req_s"] for r in runs[("disagg", "before")]] == [100, 200, 100, 100, 100]
    text = table(runs)
    assert "**1.00**" not in text  # not the ratio of the medians (100 / 100)
    assert "**0.90**" in text  # the median of 1.5, 0.5, 1.2, 0.9, 0.8
    assert "1000 → 900 (-10 %)" in text


def test_summarize_pools_several_runs(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    for i, art in enumerate((tmp_path / "a", tmp_path / "b")):
        _write(art, 1, "before", 100, 1000)
        _write(art, 1, "after", 110 + i, 950)
    assert main(["--summarize", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "disagg (2 rounds)" in capsys.readouterr().out
