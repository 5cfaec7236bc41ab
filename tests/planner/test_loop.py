"""The run loop over HTTP: a frontend's and a worker's real metric registries served on loopback, the loop
scraping them, deciding, and scaling a dry-run connector; the CLI's profile command and flag binding."""

from __future__ import annotations

import json

import pytest
from prometheus_client import start_http_server

from dynamo_lite.engines.base import EngineStats
from dynamo_lite.frontend.metrics import FrontendMetrics
from dynamo_lite.planner.cli import main, run_parser, settings_from
from dynamo_lite.planner.connectors.dry_run import DryRunConnector
from dynamo_lite.planner.decide import DECODE, PREFILL, Planner, PlannerSettings
from dynamo_lite.planner.loop import PlannerLoop
from dynamo_lite.planner.metrics import PlannerMetrics
from dynamo_lite.planner.predict import LoadPredictor, Method
from dynamo_lite.planner.profile import EngineProfile, mocker_profile
from dynamo_lite.worker.metrics import WorkerMetrics

# the loop's plumbing, not the damping: a scale-up on the first interval that asks for it
PLUMBING = PlannerSettings(interval_s=10, up_stable_intervals=1)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def served():
    """A frontend registry and a decode worker's, each on its own loopback port."""
    frontend = FrontendMetrics()
    stats = EngineStats(active_seqs=3)
    worker = WorkerMetrics(lambda: stats, {"model": "m", "role": "decode", "instance": "d1"})
    servers = [start_http_server(0, "127.0.0.1", registry=r) for r in (frontend.registry, worker.registry)]
    urls = [f"http://127.0.0.1:{s.server_port}/metrics" for s, _ in servers]
    yield frontend, urls
    for s, t in servers:
        s.shutdown()
        t.join(5)


def _serve(m: FrontendMetrics, n: int, isl: int, osl: int) -> None:
    mm = m.model("m")
    for _ in range(n):
        m.request_done("m", "chat", 200, stream=True)
        mm.input_sequence.observe(isl)
        mm.output_sequence.observe(osl)
        mm.ttft.observe(0.2)
        mm.itl.observe(0.02)


def test_the_loop_scrapes_decides_scales_and_logs(served, tmp_path, capsys) -> None:
    frontend, (frontend_url, worker_url) = served
    clock = Clock()
    connector = DryRunConnector({PREFILL: 1, DECODE: 1}, [worker_url])
    metrics = PlannerMetrics()
    loop = PlannerLoop(
        Planner(PLUMBING, mocker_profile()),
        LoadPredictor(method=Method.LAST),
        connector,
        frontend_url,
        metrics,
        tmp_path / "decisions.jsonl",
        clock=clock,
    )
    loop.prime()
    clock.t += 10
    _serve(frontend, 120, 3000, 20)  # 12 req/s of long prompts: prefill 1 → 3
    decision = loop.step()
    assert decision is not None
    assert decision.forecast.request_rate == pytest.approx(12)
    assert connector.replicas() == {PREFILL: 3, DECODE: 1}
    assert "would scale prefill 1 → 3" in capsys.readouterr().out
    record = json.loads((tmp_path / "decisions.jsonl").read_text().splitlines()[-1])
    assert record["prefill"]["target"] == 3 and record["observed"]["workers"] == {"decode": 1}
    assert record["observed"]["decode_active"] == 3
    text = metrics.render().decode()
    assert 'dynamo_lite_planner_replicas{kind="target",role="prefill"} 3.0' in text
    assert 'dynamo_lite_planner_scaling_total{cause="model",direction="up",role="prefill"} 1.0' in text


def test_a_decisions_log_that_cannot_be_written_does_not_stop_the_scaling(served, tmp_path) -> None:
    frontend, (frontend_url, worker_url) = served
    clock = Clock()
    connector = DryRunConnector({PREFILL: 1, DECODE: 1}, [worker_url])
    loop = PlannerLoop(
        Planner(PLUMBING, mocker_profile()),
        LoadPredictor(method=Method.LAST),
        connector,
        frontend_url,
        decisions_log=tmp_path / "gone" / "decisions.jsonl",  # its folder does not exist
        clock=clock,
    )
    loop.prime()
    clock.t += 10
    _serve(frontend, 120, 3000, 20)
    assert loop.step() is not None
    assert connector.replicas() == {PREFILL: 3, DECODE: 1}


def test_no_decision_without_the_frontend(tmp_path) -> None:
    connector = DryRunConnector({PREFILL: 1, DECODE: 1})
    metrics = PlannerMetrics()
    loop = PlannerLoop(
        Planner(PlannerSettings(), mocker_profile()),
        LoadPredictor(),
        connector,
        "http://127.0.0.1:9/metrics",  # discard port: nothing answers
        metrics,
    )
    loop.prime()
    assert loop.step() is None
    assert 'dynamo_lite_planner_scrape_failures_total{target="frontend"} 1.0' in metrics.render().decode()


def test_flags_bind_to_the_settings() -> None:
    args = run_parser().parse_args(["--profile", "p.json", "--ttft-ms", "800", "--max-total", "5"])
    s = settings_from(args)
    assert s.ttft_s == pytest.approx(0.8) and s.max_total == 5
    assert s.itl_s == PlannerSettings().itl_s and s.cooldown_s == PlannerSettings().cooldown_s


def test_profile_command_writes_what_the_planner_loads(tmp_path) -> None:
    out = tmp_path / "mocker.json"
    assert main(["profile", "--engine", "mocker", "--speedup-ratio", "2", "-o", str(out)]) == 0
    assert EngineProfile.load(out) == mocker_profile(speedup_ratio=2)
