"""Representative wire messages, one or more per type: the golden fixtures (``golden/*.msgpack``) are their
bytes as encoded by the first versioned release. Every later version must read those bytes (``test_wire_golden``)
and, while it writes the same wire version, reproduce them exactly (so readers of that release read ours).

Regenerate only on purpose (a new sample, never a changed one): ``python -m tests.runtime.wire_samples``.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from dynamo_lite.kv.wire import KvOp, KvReply, KvRequest, KvStatus
from dynamo_lite.protocol import (
    CardFile,
    ErrorInfo,
    FinishReason,
    Frame,
    FrameKind,
    GenerateChunk,
    GenerateRequest,
    GuidedKind,
    GuidedSpec,
    InstanceInfo,
    KvDescriptor,
    KvEvent,
    KvEventKind,
    KvRelease,
    LoadReport,
    ModelCard,
    Phase,
    ReasoningSpec,
    Role,
    SamplingOptions,
    TokenLogprobs,
    ToolArgsGrammar,
    WorkerTiming,
    encode,
)

GOLDEN = Path(__file__).parent / "golden"

_KV = KvDescriptor(
    transfer_id="t-1f2e",
    engine="torch",
    num_tokens=37,
    nbytes=1_212_416,
    secret="s3cr3t",
    host="10.0.0.7",
    port=41_000,
    host_id="host-a",
    shm_name="/dl_kv_1",
    num_layers=30,
    num_kv_heads=3,
    head_dim=64,
    dtype="float16",
    lease_s=12.5,
    opaque=b"\x00\x01state",
    cuda_ipc=b"\x93\xc4\x02ab\x00\x01",
    device_index=1,
    gpu_uuid="GPU-1234",
    release_subject="dl.ns.kv_release.i1",
    window=128,
    windowed_layers=[0, 2, 4],
)

_SAMPLING = SamplingOptions(
    max_tokens=64,
    min_tokens=2,
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    seed=1234,
    ignore_eos=True,
    stop_token_ids=[2, 7],
    guided=GuidedSpec(GuidedKind.CHOICE, choices=["yes", "no"]),
    logprobs=3,
    presence_penalty=0.5,
    frequency_penalty=0.25,
    repetition_penalty=1.1,
    min_p=0.05,
    logit_bias={42: -100.0, 7: 2.5},
    prompt_logprobs=1,
)

_LOGPROBS = TokenLogprobs([-0.25, -1.5], [[11, 12], [13, 14]], [[-0.25, -2.0], [-1.5, -1.75]])

SAMPLES: dict[str, msgspec.Struct] = {
    "generate_request_min": GenerateRequest("req-1", "m", [1, 2, 3], SamplingOptions()),
    "generate_request_prefill": GenerateRequest(
        "req-2", "SmolLM2", [1, 2, 3, 4], SamplingOptions(max_tokens=1, temperature=0.0), Phase.PREFILL
    ),
    "generate_request_decode": GenerateRequest(
        "req-3", "SmolLM2", [5, 6, 7], _SAMPLING, Phase.DECODE, _KV, [99], remote_prefill=True
    ),
    "generate_request_guided_schema": GenerateRequest(
        "req-4",
        "m",
        [1],
        SamplingOptions(guided=GuidedSpec(GuidedKind.JSON_SCHEMA, '{"type": "object"}')),
    ),
    # SamplingOptions' fields appended after wire version 1's first fixtures (``APPENDED``), set
    "generate_request_reasoning": GenerateRequest(
        "req-5",
        "gpt-oss",
        [200006, 17360],
        SamplingOptions(
            max_tokens=256,
            guided=GuidedSpec(GuidedKind.JSON_SCHEMA, '{"type": "object"}'),
            reasoning=ReasoningSpec(
                budget=64,
                answer_ids=[200005, 17196, 200008],
                forced_ids=[200007, 200006, 173781, 200005, 17196, 200008],
                start_ids=[200005, 35644, 200008],
                end_ids=[[200005, 12606, 815]],
                open_ids=[200005, 35644, 200008],
            ),
            tool_grammars=[
                ToolArgsGrammar(
                    [[316, 28, 44580, 775, 170154], [316, 28, 44580, 775, 170154, 220]], 200008, "{}"
                )
            ],
        ),
    ),
    "generate_chunk_tokens": GenerateChunk([10, 11, 12]),
    "generate_chunk_finished": GenerateChunk([13], FinishReason.LENGTH),
    "generate_chunk_prefill": GenerateChunk(
        [9],
        kv=_KV,
        cached_tokens=16,
        timing=WorkerTiming("w-1", 12.5, 1.25, 3.5, 1_212_416, "shm"),
        logprobs=TokenLogprobs([-0.5]),
        prompt_logprobs=_LOGPROBS,
    ),
    "generate_chunk_logprobs": GenerateChunk([11, 13], FinishReason.STOP, logprobs=_LOGPROBS),
    "generate_chunk_cancelled": GenerateChunk(finish_reason=FinishReason.CANCELLED),
    "generate_chunk_error": GenerateChunk(finish_reason=FinishReason.ERROR),
    "frame_ack": Frame(-1, FrameKind.ACK),
    "frame_busy": Frame(-1, FrameKind.BUSY),
    "frame_data": Frame(0, FrameKind.DATA, b"\x91\x93\x0a\x0b\x0c"),
    "frame_end": Frame(5, FrameKind.END),
    "frame_error": Frame(3, FrameKind.ERROR, encode(ErrorInfo(503, "draining", "instance_stopped"))),
    "error_info": ErrorInfo(429, "queue full", "overloaded"),
    "error_info_default_code": ErrorInfo(500, "boom"),
    "kv_descriptor": _KV,
    "kv_release": KvRelease("t-1f2e"),
    "load_report": LoadReport("w-1", 3, 1, 0.25, 4, 32),
    "kv_event_stored": KvEvent("w-1", KvEventKind.STORED, [2**63 - 1, 12345]),
    "kv_event_cleared": KvEvent("w-1", KvEventKind.CLEARED),
    "instance_info_decode": InstanceInfo(
        "i-1", "dynamo", Role.DECODE, "generate", "dl.dynamo.decode.generate.i-1", "SmolLM2", "host-a", 9100
    ),
    "instance_info_prefill": InstanceInfo(
        "i-2",
        "dynamo",
        Role.PREFILL,
        "generate",
        "dl.dynamo.prefill.generate.i-2",
        "SmolLM2",
        "host-b",
        9101,
        "decode_first",
        max_inflight=64,
    ),
    "instance_info_agg": InstanceInfo("i-3", "dynamo", Role.AGGREGATED, "generate", "a", "m"),
    "model_card": ModelCard(
        "SmolLM2",
        "/models/smollm2",
        "/models/smollm2/tokenizer.json",
        "{{ messages }}",
        8192,
        Role.DECODE,
        [2, 0],
        "<s>",
        "</s>",
        49152,
        "llama",
        "deepseek_r1",
        "hermes",
        files=[CardFile("tokenizer.json", "ab" * 32, 2_104_556)],
    ),
    "model_card_min": ModelCard("m", "/m", "/m/tokenizer.json"),
    "kv_request_claim": KvRequest(KvOp.CLAIM, "t-1f2e", "s3cr3t", ["xxh3", "crc32"]),
    "kv_request_done": KvRequest(KvOp.DONE, "t-1f2e"),
    "kv_reply_ok": KvReply(KvStatus.OK, "", 1_212_416, "xxh3", 2**63 + 5, "/dl_kv_stage"),
    "kv_reply_denied": KvReply(KvStatus.DENIED, "wrong secret"),
}


def write() -> None:
    GOLDEN.mkdir(exist_ok=True)
    for name, msg in SAMPLES.items():
        (GOLDEN / f"{name}.msgpack").write_bytes(encode(msg))


if __name__ == "__main__":
    write()
