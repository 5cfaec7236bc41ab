"""The comparison script's pure parts: command lines, readiness, ratio math, the table, py-spy parsing, the
model folder for Dynamo. Nothing here installs or starts Dynamo."""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pytest

from benchmarks import compare_dynamo as cd
from benchmarks.load.metrics import CpuUsage, Stats, Summary

AGG, AGG_ETCD, DISAGG, AGG_C1, DISAGG_C1 = (
    cd.SETUPS[n] for n in ("agg", "agg_etcd_nats", "disagg", "agg_c1", "disagg_c1")
)


def ports_for(setup: cd.Setup) -> cd.Ports:
    counter = itertools.count(20000)
    return cd.allocate_ports(setup, pick=lambda: next(counter))


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


# ---- ports and services ----
def test_ports_only_what_the_setup_uses() -> None:
    assert (ports_for(AGG).etcd, ports_for(AGG).bootstrap) == (0, 0)
    p = ports_for(DISAGG)
    assert len({p.http, p.etcd, p.etcd_peer, p.nats, p.bootstrap}) == 5
    assert p.etcd_endpoint == f"127.0.0.1:{p.etcd}" and p.nats_url == f"nats://127.0.0.1:{p.nats}"


def test_free_port_is_bindable_on_loopback() -> None:
    import socket

    port = cd.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_services_listen_on_loopback_only(tmp_path: Path) -> None:
    p = ports_for(AGG_ETCD)
    etcd, nats = cd.service_commands(p, tmp_path)
    urls = [a for a in etcd.argv if "://" in a]
    assert len(urls) == 5 and all("127.0.0.1" in u for u in urls)
    assert flag(etcd.argv, "--listen-client-urls") == f"http://127.0.0.1:{p.etcd}"
    assert nats.argv == ["nats-server", "-a", "127.0.0.1", "-p", str(p.nats)]


# ---- Dynamo's command lines ----
def dynamo(setup: cd.Setup, tmp_path: Path, **kw: object) -> list[cd.ProcSpec]:
    return cd.dynamo_commands(
        setup, "/venv/bin/python", tmp_path / "m", "M", ports_for(setup), tmp_path, **kw
    )


def test_dynamo_agg_without_services_uses_file_discovery_tcp_and_zmq(tmp_path: Path) -> None:
    fe, worker = dynamo(AGG, tmp_path)
    assert fe.argv[:3] == ["/venv/bin/python", "-m", "dynamo.frontend"]
    assert worker.argv[:3] == ["/venv/bin/python", "-m", "dynamo.mocker"]
    for spec in (fe, worker):
        assert flag(spec.argv, "--discovery-backend") == "file"
        assert flag(spec.argv, "--request-plane") == "tcp"
        assert flag(spec.argv, "--event-plane") == "zmq"
        assert spec.env["HOME"] == str(tmp_path / "home") and spec.env["DYN_FILE_KV"] == str(
            tmp_path / "dynkv"
        )
        assert spec.env["HF_HUB_OFFLINE"] == "1" and "ETCD_ENDPOINTS" not in spec.env
        assert "PYTHONPATH" in spec.drop_env
    assert flag(fe.argv, "--http-host") == "127.0.0.1"
    assert flag(worker.argv, "--speedup-ratio") == "1e+06" and flag(worker.argv, "--model-name") == "M"


def test_dynamo_disagg_over_etcd_nats(tmp_path: Path) -> None:
    specs = dynamo(DISAGG, tmp_path, request_plane="nats", speedup_ratio=100.0)
    assert [s.role for s in specs] == ["frontend", "prefill", "decode"]
    _, prefill, decode = specs
    assert flag(prefill.argv, "--disaggregation-mode") == "prefill"
    assert flag(decode.argv, "--disaggregation-mode") == "decode"
    assert flag(prefill.argv, "--bootstrap-ports") == str(ports_for(DISAGG).bootstrap)
    assert "--bootstrap-ports" not in decode.argv
    for spec in specs:
        assert flag(spec.argv, "--discovery-backend") == "etcd" and flag(spec.argv, "--event-plane") == "nats"
        assert flag(spec.argv, "--request-plane") == "nats"
        assert spec.env["ETCD_ENDPOINTS"].startswith("http://127.0.0.1:")
        assert spec.env["NATS_SERVER"].startswith("nats://127.0.0.1:")
    for spec in (prefill, decode):
        assert (
            flag(spec.argv, "--kv-transfer-bandwidth") == "0" and flag(spec.argv, "--speedup-ratio") == "100"
        )


# ---- dynamo_lite's command lines ----
def test_dynamo_lite_without_services_is_the_embedded_mode() -> None:
    (spec,) = cd.dynamo_lite_commands(AGG_C1, "py", ports_for(AGG_C1), "ns")
    assert spec.argv[:4] == ["py", "-m", "dynamo_lite", "serve"]
    assert flag(spec.argv, "--topology") == "agg" and flag(spec.argv, "--engine") == "mocker"
    assert flag(spec.argv, "--speedup-ratio") == "0" and flag(spec.argv, "--http-host") == "127.0.0.1"


@pytest.mark.parametrize(
    ("setup", "roles"),
    [(AGG_ETCD, ["worker"]), (DISAGG, ["prefill", "decode"]), (DISAGG_C1, ["prefill", "decode"])],
)
def test_dynamo_lite_distributed(setup: cd.Setup, roles: list[str]) -> None:
    p = ports_for(setup)
    fe, *workers = cd.dynamo_lite_commands(setup, "py", p, "ns", stream_interval_ms=0.0)
    assert fe.argv[:3] == ["py", "-m", "dynamo_lite.frontend"] and "--stream-interval-ms" not in fe.argv
    assert [w.role for w in workers] == roles
    for spec in (fe, *workers):
        assert flag(spec.argv, "--etcd-endpoints") == f"127.0.0.1:{p.etcd}"
        assert flag(spec.argv, "--nats-url") == f"nats://127.0.0.1:{p.nats}"
        assert flag(spec.argv, "--namespace") == "ns"
    for w in workers:
        assert flag(w.argv, "--mode") == ("agg" if w.role == "worker" else w.role)
        assert flag(w.argv, "--stream-interval-ms") == "0"


def test_dynamo_lite_keeps_its_stream_interval_by_default() -> None:
    assert not any(
        "--stream-interval-ms" in s.argv
        for s in cd.dynamo_lite_commands(DISAGG, "py", ports_for(DISAGG), "n")
    )


# ---- readiness ----
def test_health_ready_waits_for_every_role() -> None:
    inst = [{"component": "backend"}]
    assert cd.health_ready(cd.DYNAMO, AGG, {"instances": inst})
    assert not cd.health_ready(cd.DYNAMO, DISAGG, {"instances": inst})
    assert cd.health_ready(cd.DYNAMO, DISAGG, {"instances": [*inst, {"component": "prefill"}]})
    assert not cd.health_ready(cd.DYNAMO, AGG, {})
    lite = {"instances": {"prefill": ["a"], "decode": [], "agg": []}}
    assert not cd.health_ready(cd.DYNAMO_LITE, DISAGG, lite)
    lite["instances"]["decode"] = ["b"]
    assert cd.health_ready(cd.DYNAMO_LITE, DISAGG, lite)
    assert not cd.health_ready(cd.DYNAMO_LITE, AGG_ETCD, lite)
    assert cd.health_ready(cd.DYNAMO_LITE, AGG, {})  # embedded: the probe request decides


# ---- numbers ----
def test_median_drops_nan_and_paired_ratio_pairs_rounds() -> None:
    assert cd.median([3.0, float("nan"), 1.0]) == 2.0
    assert math.isnan(cd.median([]))
    # Round 1: 200/100, round 2: 90/100, round 3: 300/100 → median of (2.0, 0.9, 3.0), not 200/100.
    assert cd.paired_ratio([200.0, 90.0, 300.0], [100.0, 100.0, 100.0]) == pytest.approx(2.0)
    assert cd.paired_ratio([1.0, 4.0], [2.0, 2.0]) == pytest.approx(1.25)
    assert cd.paired_ratio([1.0], [0.0]) != cd.paired_ratio([1.0], [0.0])  # no division by zero: NaN


def run(system: str, **metrics: float) -> dict:
    return {"system": system, "metrics": metrics}


def test_summarize_setup_and_losses() -> None:
    keys = ("req_s", "tok_s", "ttft_p50_ms", "ttft_p99_ms", "frontend_cpu_us_per_req")
    rows = [  # round 1, then round 2
        (cd.DYNAMO, 100.0, 6400.0, 10.0, 20.0, 900.0),
        (cd.DYNAMO_LITE, 80.0, 5120.0, 5.0, 40.0, 1000.0),
        (cd.DYNAMO, 120.0, 7680.0, 12.0, 24.0, 900.0),
        (cd.DYNAMO_LITE, 96.0, 6144.0, 6.0, 48.0, 940.0),
    ]
    runs = [run(system, **dict(zip(keys, values, strict=True))) for system, *values in rows]
    s = cd.summarize_setup(runs)
    assert s["rounds"] == {cd.DYNAMO: 2, cd.DYNAMO_LITE: 2}
    assert s["median"][cd.DYNAMO]["req_s"] == 110.0 and s["median"][cd.DYNAMO_LITE]["req_s"] == 88.0
    assert s["ratio"]["req_s"] == pytest.approx(0.8)
    assert s["ratio"]["ttft_p50_ms"] == pytest.approx(0.5)
    lost = cd.losses(s)
    assert set(lost) == {"req_s", "tok_s", "ttft_p99_ms", "frontend_cpu_us_per_req"}  # not ttft_p50 (better)
    assert lost["ttft_p99_ms"] == pytest.approx(2.0)
    assert cd.losses(s, tolerance=0.25) == {"ttft_p99_ms": pytest.approx(2.0)}


def test_format_table_has_both_systems_and_the_ratio_row() -> None:
    runs = [run(cd.DYNAMO, req_s=100.0, tok_s=6400.0), run(cd.DYNAMO_LITE, req_s=150.0, tok_s=9600.0)]
    table = cd.format_table([AGG, DISAGG], {"agg": cd.summarize_setup(runs)})
    lines = table.splitlines()
    assert len(lines) == 2 + 3  # header, rule, Dynamo, dynamo_lite, ratio; disagg has no summary: skipped
    assert "| Dynamo 1.6.1 (n=1) | 100 | 6400 |" in lines[2]
    assert "| dynamo_lite (n=1) | 150 | 9600 |" in lines[3]
    assert "| 1.50× | 1.50× | nan× |" in lines[4]


def test_run_metrics_from_a_load_summary() -> None:
    stats = Stats(count=10, mean=2.0, std=0.0, min=1.0, max=9.0, p50=2.0, p90=5.0, p95=6.0, p99=9.0)
    summary = Summary(
        duration_s=2.0, requests=200, completed=200, errors=0, request_throughput=100.0,
        output_token_throughput=6400.0, goodput=None, total_output_tokens=12800, total_chunks=12800,
        metrics={"time_to_first_token_ms": stats, "inter_token_latency_ms": stats, "tokens_per_chunk": stats},
        client_cpu=CpuUsage(0.4, 20.0),
        server_cpu={11: CpuUsage(1.6, 80.0), 12: CpuUsage(0.4, 20.0), 13: None},
    )  # fmt: skip
    m = cd.run_metrics(summary, {"frontend": 11, "worker": 12})
    assert (m["req_s"], m["ttft_p50_ms"], m["ttft_p99_ms"], m["tokens_per_chunk"]) == (100.0, 2.0, 9.0, 2.0)
    assert m["frontend_cpu_pct"] == 80.0 and m["frontend_cpu_us_per_req"] == pytest.approx(8000.0)
    assert m["servers_cpu_pct"] == 100.0 and m["servers_cpu_us_per_req"] == pytest.approx(10000.0)
    assert m["cpu_pct.worker"] == 20.0 and m["client_cpu_pct"] == 20.0
    assert math.isnan(cd.run_metrics(summary, {"frontend": 13})["frontend_cpu_pct"])  # the process was gone


# ---- py-spy ----
def test_top_frames_self_and_inclusive() -> None:
    raw = (
        "<module> (a.py:1);run (loop.py:10);send (sse.py:5) 30\n"
        "<module> (a.py:1);run (loop.py:11);send (sse.py:7) 10\n"
        "<module> (a.py:1);run (loop.py:10);decode (codec.py:3) 60\n"
        "garbage line\n"
    )
    top = cd.top_frames(raw)
    assert top["total_samples"] == 100
    assert top["self"][0] == ("decode (codec.py)", 60, 60.0)
    assert top["self"][1] == ("send (sse.py)", 40, 40.0)  # two lines of one function add up
    inclusive = dict((f, k) for f, k, _ in top["inclusive"])
    assert inclusive["run (loop.py)"] == 100 and inclusive["<module> (a.py)"] == 100
    assert cd.top_frames("") == {"self": [], "inclusive": [], "total_samples": 0}


# ---- the model folder for Dynamo ----
def test_prepare_dynamo_model_folder(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "tokenizer.json").write_text('{"model": {}}')
    (src / "config.json").write_text(
        json.dumps({"model_type": "llama", "eos_token_id": 2, "bos_token_id": 1})
    )
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (src / "chat_template.jinja").write_text("{{ messages }}")
    before = {p.name: p.read_text() for p in src.iterdir()}
    cd.prepare_dynamo_model_folder(src, dst)
    assert {p.name for p in dst.iterdir()} == {
        "tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"
    }  # fmt: skip
    assert json.loads((dst / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((dst / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    tok = json.loads((dst / "tokenizer_config.json").read_text())
    assert tok == {"eos_token": "<|im_end|>", "chat_template": "{{ messages }}"}
    assert (dst / "tokenizer.json").read_text() == '{"model": {}}'
    assert {p.name: p.read_text() for p in src.iterdir()} == before
    cd.prepare_dynamo_model_folder(src, dst)  # again: same result


def test_prepare_dynamo_model_folder_needs_a_chat_template(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="chat template"):
        cd.prepare_dynamo_model_folder(tmp_path, tmp_path / "out")


def test_workload_per_setup() -> None:
    w = cd.Workload(concurrency=64, request_count=2000, warmup=100, c1_request_count=500, c1_warmup=10)
    assert w.for_setup(AGG) == (64, 2000, 100)
    assert w.for_setup(AGG_C1) == (1, 500, 10)
    assert w.for_setup(DISAGG_C1) == (1, 500, 10)  # the disaggregated c=1 setup: etcd + NATS, one stream
    assert DISAGG_C1.services and DISAGG_C1.topology == "disagg"


def test_cli_defaults() -> None:
    args = cd.parse_args([])
    assert args.rounds == 2 and args.setups.split(",") == list(cd.SETUPS)
    assert args.dynamo_speedup_ratio == cd.DYNAMO_SPEEDUP and args.concurrency == 64


def test_modes_name_per_token_setups_and_interleave_both() -> None:
    assert cd.setups_for_mode([AGG, DISAGG], "default") == [AGG, DISAGG]
    per_token = cd.setups_for_mode([DISAGG], "per-token")
    assert [s.name for s in per_token] == ["disagg+per_token"] and per_token[0].per_token
    assert [s.name for s in cd.setups_for_mode([AGG, DISAGG], "both")] == [
        "agg", "agg+per_token", "disagg", "disagg+per_token"
    ]  # fmt: skip


def test_per_token_setup_gives_workers_stream_per_token() -> None:
    ports = cd.Ports(http=1, etcd=2, etcd_peer=3, nats=4, bootstrap=5)
    [pt] = cd.setups_for_mode([DISAGG], "per-token")
    specs = {s.role: s.argv for s in cd.dynamo_lite_commands(pt, "py", ports, "ns")}
    assert all("--stream-per-token" in specs[r] for r in ("prefill", "decode"))
    assert "--stream-per-token" not in specs["frontend"]
    plain = {s.role: s.argv for s in cd.dynamo_lite_commands(DISAGG, "py", ports, "ns")}
    assert not any("--stream-per-token" in argv for argv in plain.values())


def test_events_per_frontend_core_second_sums_the_frontends_processes() -> None:
    events = Stats(count=100, mean=66.0, std=0.0, min=66.0, max=66.0, p50=66.0, p90=66.0, p95=66.0, p99=66.0)
    summary = Summary(
        duration_s=2.0, requests=100, completed=100, errors=0, request_throughput=50.0,
        output_token_throughput=3200.0, goodput=None, total_output_tokens=6400, total_chunks=6400,
        metrics={"events_per_request": events},
        server_cpu={11: CpuUsage(0.3, 15.0), 14: CpuUsage(0.3, 15.0), 12: CpuUsage(1.0, 50.0)},
    )  # fmt: skip
    m = cd.run_metrics(summary, {"frontend": 11, "frontend/14": 14, "decode": 12})
    assert m["events_per_req"] == 66.0
    assert m["events_per_fe_core_s"] == pytest.approx(66.0 * 100 / 0.6)  # the decode worker's CPU not counted
    assert m["frontend_cpu_us_per_req"] == pytest.approx(6000.0)


def test_events_per_core_second_is_a_loss_only_per_token() -> None:
    s = {"ratio": {"events_per_fe_core_s": 0.2, "req_s": 2.0}}
    assert cd.losses(s, per_token=True) == {"events_per_fe_core_s": 0.2}
    assert cd.losses(s, per_token=False) == {}


def test_descendants_of_this_process(tmp_path: Path) -> None:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in cd.descendants(os.getpid())
        assert cd.descendants(child.pid) == []
    finally:
        child.kill()
        child.wait()
