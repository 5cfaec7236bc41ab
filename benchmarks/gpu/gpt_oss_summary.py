"""A short text summary of ``run_gpt_oss.sh``'s results folder: ``python -m benchmarks.gpu.gpt_oss_summary DIR``."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def main(folder: str) -> None:
    d = Path(folder)
    print((d / "env.txt").read_text() if (d / "env.txt").exists() else "")
    tok = _load(d / "tokens.json")
    if isinstance(tok, dict) and "exact" in tok:
        print(f"TOKENS fp32 on {tok['device']}: exact {tok['exact']}; engine {tok.get('engine')}; "
              f"hf experts {tok.get('hf_experts')}; kv pulls {tok.get('kv_transfers')} ({tok.get('kv_bytes')} B, "
              f"{tok.get('kv_recomputes')} recomputed, cuda pool {tok.get('cuda_pool')})")  # fmt: skip
        if not all(tok["exact"].values()):
            print(f"  first differing token per prompt: {tok.get('first_diff')}")
    else:
        print(f"TOKENS: failed\n{_tail(d / 'tokens.log')}")
    step = _load(d / "step.json")
    if isinstance(step, dict) and "steps" in step:
        print(f"STEP {step['gpu']}: copy bandwidth {step['copy_bandwidth_GBps']:.0f} GB/s (r+w), weights "
              f"{step['weights_GB']:.1f} GB, experts via {step['moe_impl']}, graphs captured in "
              f"{step.get('graph_capture_s', 0):.1f} s")  # fmt: skip
        for row in step["steps"]:
            b = row["bytes_GB"]
            print(f"  batch {row['batch']:>3} ctx {row['context']}: {row['step_ms']:.2f} ms (p10-p90 "
                  f"{row['step_ms_p10_p90'][0]:.2f}-{row['step_ms_p10_p90'][1]:.2f}) vs floor {row['floor_ms']:.2f} ms "
                  f"= {row['over_floor']:.2f}x; reads GB: attn {b['attention_weights']:.2f} experts {b['experts']:.2f} "
                  f"head {b['head']:.2f} kv {b['kv']:.2f}; "
                  f"experts/layer {row['experts_used_per_layer']:.1f}")  # fmt: skip
            for name, part in row.get("parts", {}).items():
                if "error" in part:
                    print(f"    {name}: ERROR {part['error'][:200]}")
                else:
                    floor = f" (floor {part['floor_ms']:.2f})" if "floor_ms" in part else ""
                    print(f"    {name}: {part['ms']:.2f} ms{floor}")
        for k in (step.get("profile") or [])[:12]:
            if "error" in k:
                print(f"  profile: ERROR {k['error'][:300]}")
                break
            print(
                f"  {k['ms_per_step']:7.3f} ms {k['share']:5.1%} x{k['calls_per_step']:5.0f}  {k['kernel'][:80]}"
            )
    else:
        print(f"STEP: failed\n{_tail(d / 'step.log', 3000)}")
    http = _load(d / "http.json")
    if isinstance(http, list):
        for r in http:
            for run in r.get("runs", []):
                kv = ""
                if "kv_pulls" in run:
                    kv = (f" | kv pulls {run['kv_pulls']:.0f} ({run['kv_GB_total']:.1f} GB total, "
                          f"{run['kv_recomputes']:.0f} recomputed)")  # fmt: skip
                print(f"HTTP {r['topology']:<6} c={run['concurrency']:>3}: {run['output_tok_s']:7.0f} tok/s | TTFT "
                      f"p50 {run['ttft_p50_ms']:.0f} p99 {run['ttft_p99_ms']:.0f} ms | ITL p50 {run['itl_p50_ms']:.2f} "
                      f"p99 {run['itl_p99_ms']:.2f} ms | gap p99 {run['chunk_gap_p99_ms']:.1f} ms | "
                      f"{run['completed']}/{run['requests']} ok, {run['errors']} err{kv}")  # fmt: skip
            if "error" in r:
                print(f"HTTP {r['topology']}: ERROR {r['error'][:500]}")
        if any("error" in r for r in http):
            print(_tail(d / "http.log", 3000))
    elif (d / "http.log").exists():
        print(f"HTTP: failed\n{_tail(d / 'http.log', 3000)}")


if __name__ == "__main__":
    main(sys.argv[1])
