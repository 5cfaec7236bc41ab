"""``DisaggregatedParams`` ⇄ ``KvDescriptor.opaque``: what the prefill worker hands the decode worker."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from types import ModuleType

import pytest

from dynamo_lite.engines.trtllm.disagg import (
    DisaggParamsError,
    decode_disaggregated_params,
    encode_disaggregated_params,
    generation_only_params,
)
from dynamo_lite.protocol import KvDescriptor, decode, encode


@dataclass(kw_only=True)
class ContextOutputParams:
    """The shape of TensorRT-LLM's DisaggregatedParams on a context-only output (plus a tensor-ish field)."""

    request_type: str | None = "context_only"
    first_gen_tokens: list[int] | None = None
    first_gen_log_probs: list | None = None
    ctx_request_id: int | None = None
    opaque_state: bytes | None = None
    draft_tokens: list[int] | None = None
    disagg_request_id: int | None = None
    ctx_dp_rank: int | None = None
    ctx_info_endpoint: str | None = None


STATE = bytes(range(256)) * 3  # every byte value, as transceiver state may hold


def test_round_trip_keeps_every_plain_field() -> None:
    params = ContextOutputParams(
        first_gen_tokens=[464],
        ctx_request_id=9_007_199_254_740_993,  # above 2**53: must survive JSON exactly
        opaque_state=STATE,
        draft_tokens=[1, 2, 3],
        disagg_request_id=42,
        ctx_dp_rank=3,
        ctx_info_endpoint="tcp://10.0.0.1:5555",
        first_gen_log_probs=[object()],  # process-local: never sent
    )
    fields = decode_disaggregated_params(encode_disaggregated_params(params))
    assert fields == {
        "first_gen_tokens": [464],
        "ctx_request_id": 9_007_199_254_740_993,
        "opaque_state": STATE,
        "draft_tokens": [1, 2, 3],
        "disagg_request_id": 42,
        "ctx_dp_rank": 3,
        "ctx_info_endpoint": "tcp://10.0.0.1:5555",
    }


def test_encoding_is_readable_json_with_base64_state() -> None:
    data = encode_disaggregated_params(
        ContextOutputParams(first_gen_tokens=[7], ctx_request_id=5, opaque_state=b"\x00\xff")
    )
    assert json.loads(data) == {"v": 1, "ctx_request_id": 5, "first_gen_tokens": [7], "opaque_state": "AP8="}


def test_opaque_survives_the_wire_inside_a_kv_descriptor() -> None:
    opaque = encode_disaggregated_params(
        ContextOutputParams(first_gen_tokens=[7], ctx_request_id=5, opaque_state=STATE)
    )
    kv = decode(
        encode(KvDescriptor(transfer_id="5", engine="trtllm", num_tokens=3, nbytes=0, opaque=opaque)),
        KvDescriptor,
    )
    assert decode_disaggregated_params(kv.opaque)["opaque_state"] == STATE


def test_encode_needs_request_id_and_first_token() -> None:
    with pytest.raises(DisaggParamsError, match="without a request id"):
        encode_disaggregated_params(ContextOutputParams(first_gen_tokens=[1]))
    with pytest.raises(DisaggParamsError, match="without first_gen_tokens"):
        encode_disaggregated_params(ContextOutputParams(ctx_request_id=1, first_gen_tokens=[]))


def good(**override: object) -> bytes:
    obj = {
        "v": 1,
        "ctx_request_id": 5,
        "first_gen_tokens": [7],
        "opaque_state": base64.b64encode(b"s").decode(),
    }
    obj.update(override)
    return json.dumps({k: v for k, v in obj.items() if v is not None}).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80\x81 not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (good(v=2), "unsupported version 2"),
        (good(ctx_request_id=None), "missing ctx_request_id"),
        (good(ctx_request_id="5"), "ctx_request_id must be an integer"),
        (good(ctx_request_id=True), "ctx_request_id must be an integer"),
        (good(first_gen_tokens=None), "missing first_gen_tokens"),
        (good(first_gen_tokens=[1, "2"]), "first_gen_tokens must be a list of token ids"),
        (good(opaque_state="***"), "opaque_state is not valid base64"),
        (good(opaque_state=[1]), "opaque_state must be a base64 string"),
    ],
)
def test_decode_refuses_malformed_state(data: bytes, message: str) -> None:
    with pytest.raises(DisaggParamsError, match=message):
        decode_disaggregated_params(data)


def test_generation_only_params_with_the_tensorrt_llm_class(standin: ModuleType) -> None:
    fields = decode_disaggregated_params(good(ctx_dp_rank=1, future_field=3))
    params = generation_only_params(standin.DisaggregatedParams, {**fields, "not_in_this_version": 1})
    assert isinstance(params, standin.DisaggregatedParams)
    assert params.request_type == "generation_only"
    assert (params.ctx_request_id, params.first_gen_tokens, params.opaque_state) == (5, [7], b"s")
    assert params.ctx_dp_rank == 1


def test_generation_only_params_with_a_plain_class() -> None:
    class Params:
        def __init__(self, request_type: str, ctx_request_id: int, first_gen_tokens: list[int]) -> None:
            self.request_type, self.ctx_request_id, self.first_gen_tokens = (
                request_type,
                ctx_request_id,
                first_gen_tokens,
            )

    params = generation_only_params(Params, decode_disaggregated_params(good()))
    assert (params.request_type, params.ctx_request_id, params.first_gen_tokens) == (
        "generation_only",
        5,
        [7],
    )
