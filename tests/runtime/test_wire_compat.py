"""Wire compatibility one version either way, against the golden bytes (``wire_samples``): a next version
that adds a trailing optional field, or an enum value, is read by this one, and this one's bytes are read by
the next; a version this one can't read is refused as a server error (``IncompatibleWire``, 503)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from dynamo_lite.frontend.errors import as_openai_error
from dynamo_lite.frontend.output import _finish_reason
from dynamo_lite.kv.wire import KvOp, KvReply, KvRequest, KvStatus
from dynamo_lite.placement.kv_index import KvIndex
from dynamo_lite.protocol import (
    WIRE_VERSION,
    ErrorInfo,
    FinishReason,
    Frame,
    FrameKind,
    GenerateChunk,
    GenerateRequest,
    GuidedKind,
    IncompatibleWire,
    InstanceInfo,
    KvEvent,
    KvEventKind,
    ModelCard,
    Role,
    SamplingOptions,
    StreamError,
    WireError,
    WireVersionError,
    decode,
    encode,
)
from dynamo_lite.runtime.streams import error_info_for
from tests.runtime.wire_samples import GOLDEN, SAMPLES

NAMES = sorted(SAMPLES)


def golden(name: str) -> bytes:
    return (GOLDEN / f"{name}.msgpack").read_bytes()


def fields(data: bytes) -> list[Any]:
    value = msgspec.msgpack.decode(data)
    assert isinstance(value, list)
    return value


def raw(values: list[Any]) -> bytes:
    return msgspec.msgpack.encode(values)


def next_version(kind: type) -> type:
    """``kind`` as the next version declares it: one more optional field at the end."""
    return msgspec.defstruct(f"Next{kind.__name__}", [("added", str, "")], bases=(kind,))


@pytest.mark.parametrize("name", NAMES)
def test_a_next_version_field_is_ignored(name: str) -> None:
    sample = SAMPLES[name]
    assert decode(raw([*fields(golden(name)), "added", {"any": [1]}]), type(sample)) == sample


@pytest.mark.parametrize("name", NAMES)
def test_the_next_version_reads_todays_bytes_and_writes_what_today_reads(name: str) -> None:
    sample = SAMPLES[name]
    nxt = next_version(type(sample))
    theirs = decode(golden(name), nxt)
    assert theirs.added == "" and all(
        getattr(theirs, f) == getattr(sample, f) for f in type(sample).__struct_fields__
    )
    theirs.added = "set"
    assert decode(encode(theirs), type(sample)) == sample


def todays_appended_defaults(kind: type, written: list[Any]) -> list[Any]:
    """The fields of ``kind`` after the ``written`` ones, at their defaults, as a next version writes them (every
    field before its own, ``APPENDED`` or not)."""
    return fields(msgspec.msgpack.encode(kind()))[len(written) :]


def test_a_nested_next_version_field_is_ignored() -> None:
    request = fields(golden("generate_request_decode"))
    request[3] = [*request[3], *todays_appended_defaults(SamplingOptions, request[3]), "sampling v2"]
    request[5] = [*request[5], "kv v2"]  # KvDescriptor
    assert decode(raw(request), GenerateRequest) == SAMPLES["generate_request_decode"]


def test_unknown_enum_values_decode_to_unrecognized() -> None:
    frame = decode(raw([4, 99, b"x"]), Frame)
    assert frame.kind is FrameKind.UNRECOGNIZED and frame.payload == b"x"
    chunk = fields(golden("generate_chunk_finished"))
    chunk[1] = "content_filter"
    assert decode(raw(chunk), GenerateChunk).finish_reason is FinishReason.UNRECOGNIZED
    info = fields(golden("instance_info_decode"))
    info[2] = "encode"
    assert decode(raw(info), InstanceInfo).role is Role.UNRECOGNIZED
    card = fields(golden("model_card"))
    card[5] = "encode"
    assert decode(raw(card), ModelCard).role is Role.UNRECOGNIZED
    event = fields(golden("kv_event_stored"))
    event[1] = 7
    assert decode(raw(event), KvEvent).kind is KvEventKind.UNRECOGNIZED
    assert decode(raw([42]), KvRequest).op is KvOp.UNRECOGNIZED
    assert decode(raw([42, "?"]), KvReply).status is KvStatus.UNRECOGNIZED


def test_a_request_with_an_unknown_phase_or_grammar_says_which() -> None:
    request = fields(golden("generate_request_prefill"))
    assert decode(raw(request), GenerateRequest).unrecognized() is None
    request[4] = 9
    assert decode(raw(request), GenerateRequest).unrecognized() == "phase"
    request = fields(golden("generate_request_guided_schema"))
    request[3][8][0] = 9
    decoded = decode(raw(request), GenerateRequest)
    assert decoded.sampling.guided.kind is GuidedKind.UNRECOGNIZED
    assert decoded.unrecognized() == "sampling.guided.kind"


def test_enums_still_refuse_values_of_the_wrong_type() -> None:
    with pytest.raises(WireError):
        decode(raw([0, "data"]), Frame)


def test_an_unknown_finish_reason_ends_the_answer_as_stop() -> None:
    assert _finish_reason(FinishReason.UNRECOGNIZED) == "stop"


def test_routers_ignore_an_unknown_kv_event() -> None:
    index = KvIndex(approx_ttl_s=60.0)
    index.apply(KvEvent("w", KvEventKind.STORED, [1, 2]))
    index.apply(KvEvent("w", KvEventKind.UNRECOGNIZED, [1, 2]))
    assert index.overlap("w", [1, 2]) == 2
    index.apply(KvEvent("w", KvEventKind.REMOVED, [2]))
    assert index.overlap("w", [1, 2]) == 1


@pytest.mark.parametrize("name", [n for n in NAMES if "version" in type(SAMPLES[n]).__struct_fields__])
def test_a_newer_version_is_refused_typed(name: str) -> None:
    kind = type(SAMPLES[name])
    at = kind.__struct_fields__.index("version")
    values = fields(golden(name))
    assert values[at] == WIRE_VERSION  # every versioned message carries it
    values[at] = WIRE_VERSION + 1
    with pytest.raises(WireVersionError, match=f"version {WIRE_VERSION + 1}"):
        decode(raw(values), kind)
    values[at] = 0
    with pytest.raises(WireVersionError):
        decode(raw(values), kind)


def test_a_newer_version_is_refused_typed_even_when_its_layout_changed() -> None:
    values = fields(golden("generate_request_min"))
    values[2] = "token ids, now a string"
    with pytest.raises(WireError) as same_version:
        decode(raw(values), GenerateRequest)
    assert not isinstance(same_version.value, WireVersionError)
    values[-1] = WIRE_VERSION + 1
    with pytest.raises(WireVersionError):
        decode(raw(values), GenerateRequest)


@pytest.mark.parametrize("exc", [WireVersionError("GenerateRequest of wire version 2"), WireError("bad")])
def test_an_unreadable_request_is_a_server_error_not_the_clients(exc: WireError) -> None:
    info = error_info_for(exc)
    assert (info.status, info.code) == (503, "wire_incompatible")
    error = StreamError.from_info(decode(encode(info), ErrorInfo))  # as the caller gets it over the plane
    assert isinstance(error, IncompatibleWire) and error.retryable
    answered = as_openai_error(error)
    assert (answered.status, answered.type, answered.code) == (
        503,
        "service_unavailable",
        "wire_incompatible",
    )


def test_todays_sampling_defaults_still_fill_in_a_shorter_message() -> None:
    """An older writer's message (fewer trailing fields) reads with this version's defaults."""
    shorter = decode(raw(fields(golden("instance_info_prefill"))[:6]), InstanceInfo)
    assert (shorter.host, shorter.max_inflight, shorter.version) == ("", 0, WIRE_VERSION)


# SamplingOptions' fields appended after the golden fixtures (``reasoning``, ``tool_grammars``): trailing, optional,
# written only when set; the version before them reads a request that sets them, ignoring them.

_APPENDED = SamplingOptions.APPENDED


def test_sampling_options_appended_fields_are_trailing_with_defaults() -> None:
    assert _APPENDED == ("reasoning", "tool_grammars")
    assert SamplingOptions.__struct_fields__[-len(_APPENDED) :] == _APPENDED
    defaults = SamplingOptions()
    assert defaults.reasoning is None and defaults.tool_grammars == []


@pytest.mark.parametrize("name", [n for n in NAMES if isinstance(SAMPLES[n], GenerateRequest)])
def test_the_previous_versions_requests_decode_with_the_appended_fields_unset(name: str) -> None:
    """Bytes of the version before them (the golden requests but the one that sets them, and that one cut to
    the previous layout) read with their defaults."""
    request = fields(golden(name))
    previous = len(SamplingOptions.__struct_fields__) - len(_APPENDED)
    assert len(request[3]) >= previous
    request[3] = request[3][:previous]
    decoded = decode(raw(request), GenerateRequest)
    assert decoded.sampling.reasoning is None and decoded.sampling.tool_grammars == []
    sample = SAMPLES[name]
    assert all(
        getattr(decoded.sampling, f) == getattr(sample.sampling, f)
        for f in SamplingOptions.__struct_fields__
        if f not in _APPENDED
    )


def test_a_request_that_sets_none_of_them_is_written_as_the_previous_version_wrote_it() -> None:
    previous = len(SamplingOptions.__struct_fields__) - len(_APPENDED)
    for name in ("generate_request_min", "generate_request_decode", "generate_request_guided_schema"):
        assert len(fields(encode(SAMPLES[name]))[3]) == previous
        assert encode(SAMPLES[name]) == golden(name)


def test_a_request_writes_the_appended_fields_it_sets_and_those_before_them() -> None:
    sample = SAMPLES["generate_request_reasoning"]
    assert len(fields(golden("generate_request_reasoning"))[3]) == len(SamplingOptions.__struct_fields__)
    only_reasoning = msgspec.structs.replace(
        sample, sampling=msgspec.structs.replace(sample.sampling, tool_grammars=[])
    )
    written = fields(encode(only_reasoning))[3]
    assert len(written) == len(SamplingOptions.__struct_fields__) - 1
    assert decode(encode(only_reasoning), GenerateRequest) == only_reasoning
    only_tools = msgspec.structs.replace(
        sample, sampling=msgspec.structs.replace(sample.sampling, reasoning=None)
    )
    written = fields(encode(only_tools))[3]
    assert len(written) == len(SamplingOptions.__struct_fields__) and written[-2] is None
    assert decode(encode(only_tools), GenerateRequest) == only_tools


def _previous_layout(kind: type, drop: tuple[str, ...], **nested: type) -> type:
    """``kind`` as the version before ``drop`` declares it (``nested``: fields of an earlier layout's type)."""
    specs = []
    for f in msgspec.structs.fields(kind):
        if f.name in drop:
            continue
        default = (
            f.default
            if f.default is not msgspec.NODEFAULT
            else msgspec.field(default_factory=f.default_factory)
        )
        typ = nested.get(f.name, f.type)
        specs.append((f.name, typ) if f.required else (f.name, typ, default))
    return msgspec.defstruct(f"Previous{kind.__name__}", specs, array_like=True)


def test_the_previous_version_reads_a_request_that_sets_them() -> None:
    previous_sampling = _previous_layout(SamplingOptions, _APPENDED)
    previous_request = _previous_layout(GenerateRequest, (), sampling=previous_sampling)
    sample = SAMPLES["generate_request_reasoning"]
    theirs = msgspec.msgpack.decode(golden("generate_request_reasoning"), type=previous_request)
    assert theirs.request_id == sample.request_id and theirs.version == WIRE_VERSION
    assert all(
        getattr(theirs.sampling, f) == getattr(sample.sampling, f)
        for f in SamplingOptions.__struct_fields__
        if f not in _APPENDED
    )
