"""TensorRT-LLM's ``DisaggregatedParams`` on our wire: the prefill result travels in ``KvDescriptor.opaque``.

A context-only request on the prefill worker returns ``DisaggregatedParams`` (``ctx_request_id``,
``first_gen_tokens``, ``opaque_state`` — the bytes that tell the decode worker's cache transceiver where to
pull the KV from — and optionally draft tokens). We carry them as a small JSON object with ``opaque_state`` in
base64, so the descriptor stays readable and no pickle ever crosses the wire::

    {"v": 1, "ctx_request_id": 7, "first_gen_tokens": [464], "opaque_state": "AAEC..."}

The decode worker rebuilds them with ``request_type="generation_only"``. TensorRT-LLM itself moves the KV
bytes (UCX/NIXL, per ``cache_transceiver_config``); ``KvDescriptor.nbytes`` is 0 because we never see them.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import inspect
import json
from typing import Any

OPAQUE_VERSION = 1

# Plain-data fields of DisaggregatedParams that a generation-only request needs; the rest (logits, log-probs,
# multimodal handles) are tensors or process-local handles and stay on the prefill worker.
_INT_FIELDS = ("ctx_request_id", "disagg_request_id", "ctx_dp_rank")
_TOKEN_FIELDS = ("first_gen_tokens", "draft_tokens")
_STR_FIELDS = ("ctx_info_endpoint",)


class DisaggParamsError(ValueError):
    """A KV descriptor's opaque payload is not usable TensorRT-LLM disaggregated state."""


def encode_disaggregated_params(params: Any) -> bytes:
    """Encode the disaggregated params of a context-only output (a ``DisaggregatedParams``) as JSON bytes."""
    out: dict[str, Any] = {"v": OPAQUE_VERSION}
    for name in _INT_FIELDS:
        value = getattr(params, name, None)
        if value is not None:
            out[name] = int(value)
    for name in _TOKEN_FIELDS:
        value = getattr(params, name, None)
        if value is not None:
            out[name] = [int(t) for t in value]
    for name in _STR_FIELDS:
        value = getattr(params, name, None)
        if value is not None:
            out[name] = value
    state = getattr(params, "opaque_state", None)
    if state is not None:
        out["opaque_state"] = base64.b64encode(bytes(state)).decode("ascii")
    if "ctx_request_id" not in out and "disagg_request_id" not in out:
        raise DisaggParamsError("TensorRT-LLM returned disaggregated params without a request id")
    if not out.get("first_gen_tokens"):
        raise DisaggParamsError("TensorRT-LLM returned disaggregated params without first_gen_tokens")
    return json.dumps(out, separators=(",", ":")).encode()


def decode_disaggregated_params(data: bytes) -> dict[str, Any]:
    """Decode :func:`encode_disaggregated_params` output into ``DisaggregatedParams`` keyword arguments
    (``opaque_state`` back to bytes). Raises :class:`DisaggParamsError` on anything malformed."""
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DisaggParamsError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise DisaggParamsError("not a JSON object")
    if obj.get("v") != OPAQUE_VERSION:
        raise DisaggParamsError(f"unsupported version {obj.get('v')!r} (expected {OPAQUE_VERSION})")
    fields: dict[str, Any] = {}
    for name in _INT_FIELDS:
        value = obj.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool):
                raise DisaggParamsError(f"{name} must be an integer")
            fields[name] = value
    for name in _TOKEN_FIELDS:
        value = obj.get(name)
        if value is not None:
            if not isinstance(value, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in value
            ):
                raise DisaggParamsError(f"{name} must be a list of token ids")
            fields[name] = value
    for name in _STR_FIELDS:
        if obj.get(name) is not None:
            fields[name] = obj[name]
    state = obj.get("opaque_state")
    if state is not None:
        if not isinstance(state, str):
            raise DisaggParamsError("opaque_state must be a base64 string")
        try:
            fields["opaque_state"] = base64.b64decode(state, validate=True)
        except binascii.Error as e:
            raise DisaggParamsError(f"opaque_state is not valid base64: {e}") from None
    if "ctx_request_id" not in fields and "disagg_request_id" not in fields:
        raise DisaggParamsError("missing ctx_request_id")
    if not fields.get("first_gen_tokens"):
        raise DisaggParamsError("missing first_gen_tokens")
    return fields


def generation_only_params(params_cls: type, fields: dict[str, Any]) -> Any:
    """Build ``params_cls(request_type="generation_only", ...)`` from decoded fields, keeping only the fields
    this TensorRT-LLM version knows (a newer prefill worker may send fields an older decode worker lacks)."""
    known = _field_names(params_cls)
    kwargs = {k: v for k, v in fields.items() if k in known}
    return params_cls(request_type="generation_only", **kwargs)


def field_names(cls: type) -> set[str]:
    """The constructor fields of a ``DisaggregatedParams`` class (a dataclass in every release)."""
    return _field_names(cls)


def _field_names(cls: type) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set(inspect.signature(cls).parameters)
