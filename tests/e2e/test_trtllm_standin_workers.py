"""Issue 4: the TensorRT-LLM adapter through real worker processes, etcd and NATS — against the STAND-IN
``tensorrt_llm`` (tests/engines/trtllm/standin, not TensorRT-LLM: that needs NVIDIA GPUs). The stand-in refuses
a generation_only request whose opaque state or ctx_request_id doesn't match its context_only run, so a
completed request proves the disaggregated params crossed prefill → frontend → decode intact."""

from __future__ import annotations

import subprocess
import sys
import uuid

import httpx
import openai

from tests.conftest import ROOT, Services, start_frontend, start_worker, wait_until

STANDIN = ROOT / "tests" / "engines" / "trtllm" / "standin"
MODEL = "gpt-oss-standin"


def test_prefill_and_decode_workers_round_trip_with_opaque_state(services: Services, monkeypatch) -> None:
    from dynamo_lite.model_files import resolve_model

    folder = (
        resolve_model().folder
    )  # a real HF-style folder (tokenizer, config): the stand-in needs no weights
    monkeypatch.setenv("PYTHONPATH", f"{STANDIN}:{ROOT}")
    ns = f"t{uuid.uuid4().hex[:8]}"
    args = (
        "--engine",
        "trtllm",
        "--model-path",
        str(folder),
        "--served-model-name",
        MODEL,
        "--extra-engine-args",
        str(ROOT / "engine_configs" / "gpt_oss" / "{mode}.yaml"),
    )
    procs = []
    try:
        for mode in ("prefill", "decode"):
            mode_args = tuple(a.replace("{mode}", mode) for a in args)
            procs.append(start_worker(services, ns, mode, *mode_args, engine="trtllm"))
        frontend = start_frontend(services, ns)
        procs.append(frontend)
        url = f"http://127.0.0.1:{frontend.port}"
        wait_until(lambda: MODEL in httpx.get(url + "/v1/models", timeout=2).text, 15, what="model listed")
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Explain disaggregated serving."}],
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"nvext": {"ignore_eos": True}},
        )
        usage, finish = None, None
        for chunk in stream:
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        assert finish == "length" and usage is not None
        assert usage.completion_tokens == 40  # the prefill's first token + 39 from the decode worker
        assert usage.prompt_tokens > 5
        # Logprobs across the handoff: the first token's from the prefill worker, the rest from the decode
        # worker, the echoed prompt's scored once by the prefill (TensorRT-LLM's top k: null outside it).
        scored = client.completions.create(
            model=MODEL,
            prompt="Disaggregated serving splits prefill and decode.",
            max_tokens=6,
            logprobs=2,
            echo=True,
            extra_body={"nvext": {"ignore_eos": True}},
        )
        lp = scored.choices[0].logprobs
        assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == scored.usage.prompt_tokens + 6
        generated = lp.token_logprobs[-6:]
        # The stand-in reports each sampled token's (the first one's through the handoff's first chunk).
        assert all(isinstance(v, float) and v < 0 for v in generated), lp.token_logprobs
        assert all(len(top) == 2 for top in lp.top_logprobs[-6:])
        assert lp.token_logprobs[0] is None and all(len(top) == 2 for top in lp.top_logprobs[1:-6])
        prefill_log, decode_log = procs[0].log(), procs[1].log()
        assert "Traceback" not in prefill_log + decode_log
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.popen.wait(10)


def test_worker_without_tensorrt_llm_exits_with_one_clear_line() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dynamo_lite.worker",
            "--engine",
            "trtllm",
            "--mode",
            "prefill",
            "--in-memory",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert run.returncode != 0
    lines = [ln for ln in run.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "TensorRT-LLM" in lines[0] and "pip install" in lines[0], run.stderr
