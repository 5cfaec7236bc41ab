"""``dynamo_lite.engines.engine_args``: YAML loading, the merge rule, schema checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_lite.engines.engine_args import (
    ANY,
    Choice,
    EngineArgsError,
    check_engine_args,
    deep_merge,
    load_engine_args_yaml,
)


def write(tmp_path: Path, text: str, name: str = "args.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- loading ---------------------------------------------------------------------------------------------


def test_load_reads_nested_mapping(tmp_path: Path) -> None:
    path = write(
        tmp_path, "max_batch_size: 8\nkv_cache_config:\n  free_gpu_memory_fraction: 0.5\nflag: true\n"
    )
    assert load_engine_args_yaml(path) == {
        "max_batch_size": 8,
        "kv_cache_config": {"free_gpu_memory_fraction": 0.5},
        "flag": True,
    }


def test_load_empty_file_is_empty_mapping(tmp_path: Path) -> None:
    assert load_engine_args_yaml(write(tmp_path, "# nothing here\n")) == {}


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(EngineArgsError, match=r"--extra-engine-args .*nope\.yaml: file not found"):
        load_engine_args_yaml(tmp_path / "nope.yaml")


def test_load_bad_yaml_gives_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "a: 1\nb: [1, 2\nc: 3\n", "bad.yaml")
    with pytest.raises(EngineArgsError) as info:
        load_engine_args_yaml(path)
    message = str(info.value)
    assert "bad.yaml: invalid YAML (line" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "list"), ("just a string\n", "string"), ("3\n", "integer")]
)
def test_load_refuses_non_mapping(tmp_path: Path, text: str, kind: str) -> None:
    with pytest.raises(
        EngineArgsError, match=f"must be a mapping of engine argument names to values, got {kind}"
    ):
        load_engine_args_yaml(write(tmp_path, text))


def test_load_refuses_duplicate_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "max_batch_size: 8\nkv_cache_config:\n  dtype: fp8\n  dtype: auto\n")
    with pytest.raises(EngineArgsError, match=r"args\.yaml: line 4: key 'dtype' appears twice"):
        load_engine_args_yaml(path)


def test_load_refuses_non_string_keys(tmp_path: Path) -> None:
    with pytest.raises(EngineArgsError, match=r"key section\.1 is not a string"):
        load_engine_args_yaml(write(tmp_path, "section:\n  1: one\n"))


def test_load_does_not_construct_python_objects(tmp_path: Path) -> None:
    with pytest.raises(EngineArgsError, match="invalid YAML"):
        load_engine_args_yaml(write(tmp_path, "x: !!python/object/apply:os.system ['true']\n"))


# -- merging ---------------------------------------------------------------------------------------------


def test_merge_nested_mappings_key_by_key() -> None:
    base = {"max_batch_size": 16, "kv_cache_config": {"free_gpu_memory_fraction": 0.9, "dtype": "auto"}}
    override = {"kv_cache_config": {"dtype": "fp8"}, "enable_attention_dp": True}
    assert deep_merge(base, override) == {
        "max_batch_size": 16,
        "kv_cache_config": {"free_gpu_memory_fraction": 0.9, "dtype": "fp8"},
        "enable_attention_dp": True,
    }


def test_merge_override_wins_for_scalars_lists_and_null() -> None:
    base = {"a": 1, "b": [1, 2, 3], "c": {"x": 1}, "d": {"y": 2}}
    override = {"a": 2, "b": [9], "c": None, "d": 5}
    assert deep_merge(base, override) == {"a": 2, "b": [9], "c": None, "d": 5}


def test_merge_mapping_replaces_scalar_below_it() -> None:
    assert deep_merge({"c": None}, {"c": {"x": 1}}) == {"c": {"x": 1}}


def test_merge_leaves_inputs_untouched_and_shares_nothing() -> None:
    base = {"kv": {"a": 1}, "list": [1]}
    override = {"kv": {"b": 2}, "other": {"z": [1]}}
    merged = deep_merge(base, override)
    merged["kv"]["a"] = 100
    merged["list"].append(2)
    merged["other"]["z"].append(2)
    assert base == {"kv": {"a": 1}, "list": [1]}
    assert override == {"kv": {"b": 2}, "other": {"z": [1]}}


# -- checking --------------------------------------------------------------------------------------------

SCHEMA = {
    "max_batch_size": int,
    "fraction": float,
    "flag": bool,
    "name": str,
    "sizes": list,
    "anything": ANY,
    "backend": Choice("pytorch", "_autodeploy"),
    "either": (int, str),
    "section": {"dtype": str, "tokens": int, "deeper": {"x": int}},
}


def test_check_accepts_right_types_and_null() -> None:
    args = {
        "max_batch_size": 8,
        "fraction": 1,  # an integer is a number
        "flag": False,
        "name": "x",
        "sizes": [1, 2],
        "anything": {"whatever": object()},
        "backend": "PyTorch",  # case-insensitive choice
        "either": "auto",
        "section": {"dtype": "fp8", "tokens": None, "deeper": {"x": 1}},
    }
    assert check_engine_args(args, SCHEMA, source="a.yaml") == []
    assert check_engine_args({"section": None, "max_batch_size": None}, SCHEMA) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"max_batch_size": True}, "max_batch_size: expected an integer, got boolean (True)"),
        ({"max_batch_size": "8"}, "max_batch_size: expected an integer, got string ('8')"),
        ({"max_batch_size": 8.5}, "max_batch_size: expected an integer, got number (8.5)"),
        ({"fraction": "0.8"}, "fraction: expected a number, got string ('0.8')"),
        ({"flag": 1}, "flag: expected true or false, got integer (1)"),
        ({"backend": "tensorrt"}, "backend: expected one of pytorch, _autodeploy, got ('tensorrt')"),
        ({"either": 1.5}, "either: expected an integer or a string, got number (1.5)"),
        ({"section": 3}, "section: expected a mapping, got integer (3)"),
        ({"section": {"tokens": "many"}}, "section.tokens: expected an integer, got string ('many')"),
        ({"section": {"deeper": {"x": []}}}, "section.deeper.x: expected an integer, got list ([])"),
    ],
)
def test_check_wrong_type_names_file_and_key(args: dict, expected: str) -> None:
    with pytest.raises(EngineArgsError) as info:
        check_engine_args(args, SCHEMA, source="engine_configs/x.yaml")
    assert str(info.value) == f"engine_configs/x.yaml: {expected}"


def test_check_lists_every_wrong_value() -> None:
    with pytest.raises(EngineArgsError) as info:
        check_engine_args({"flag": "yes", "section": {"dtype": 8}}, SCHEMA, source="f.yaml")
    assert str(info.value) == (
        "f.yaml: flag: expected true or false, got string ('yes'); "
        "section.dtype: expected a string, got integer (8)"
    )


def test_check_warns_about_unknown_keys_at_any_depth() -> None:
    warnings = check_engine_args(
        {"use_cuda_graph": True, "section": {"dtyp": "fp8", "deeper": {"y": 1}}}, SCHEMA, source="f.yaml"
    )
    assert warnings == [
        "f.yaml: unknown key 'use_cuda_graph' (passed to the engine as is)",
        "f.yaml: unknown key 'section.dtyp' (passed to the engine as is)",
        "f.yaml: unknown key 'section.deeper.y' (passed to the engine as is)",
    ]


def test_check_long_values_are_shortened() -> None:
    with pytest.raises(EngineArgsError) as info:
        check_engine_args({"name": ["x" * 100]}, SCHEMA)
    assert len(str(info.value)) < 120
    assert str(info.value).endswith("...)")
