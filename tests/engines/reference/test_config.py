"""The torch engine's settings: worker flags, YAML on top, validation, the shipped SmolLM2 configs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.engines.engine_args import load_engine_args_yaml
from dynamo_lite.engines.reference.config import ConfigError, from_settings

CONFIGS = Path(__file__).resolve().parents[3] / "engine_configs" / "smollm2"


def test_yaml_keys_win_over_flags_and_reach_the_kv_config() -> None:
    settings = EngineSettings(
        role="decode", dtype="float32", threads=4, max_batch_size=8, kv_port=5000,
        extra={"dtype": "bf16", "threads": 1, "kv_lease_s": 5, "kv_use_shm": False}, extra_source="d.yaml",
    )  # fmt: skip
    cfg = from_settings(settings)
    assert (cfg.role, cfg.dtype, cfg.threads, cfg.max_batch_size) == ("decode", "bfloat16", 1, 8)
    kv = cfg.kv_config()
    assert (kv.port, kv.lease_s, kv.use_shm) == (5000, 5.0, False)


def test_unknown_key_is_a_warning_naming_key_and_file(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        from_settings(EngineSettings(extra={"max_batch_sise": 4}, extra_source="agg.yaml"))
    assert "max_batch_sise" in caplog.text and "agg.yaml" in caplog.text


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"threads": "two"}, "threads"),
        ({"dtype": "int8"}, "dtype"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"kv_failure_policy": "retry"}, "kv_failure_policy"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_values_are_errors_naming_the_file(extra: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        from_settings(EngineSettings(extra=extra, extra_source="bad.yaml"))
    assert "bad.yaml" in str(info.value)


@pytest.mark.parametrize("mode", ["prefill", "decode", "agg"])
def test_shipped_configs_are_valid_and_complete(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    path = CONFIGS / f"{mode}.yaml"
    with caplog.at_level(logging.WARNING):
        cfg = from_settings(
            EngineSettings(role=mode, extra=load_engine_args_yaml(path), extra_source=str(path))
        )
    assert not caplog.records, caplog.text
    assert cfg.role == mode and cfg.device == "cpu" and cfg.threads >= 1
    assert cfg.max_num_tokens >= cfg.max_batch_size
