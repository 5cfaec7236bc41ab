"""Every default is stated once, in a settings object: the CLIs (worker, frontend, serve) show those defaults
and, given no flags, build exactly the settings objects' defaults — except where serve or the frontend differ on
purpose, each such difference a named constant with its reason next to it."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from dynamo_lite import serve
from dynamo_lite.engines.base import EngineSettings
from dynamo_lite.frontend import __main__ as frontend_cli
from dynamo_lite.frontend.settings import FrontendSettings
from dynamo_lite.placement import PlacementSettings
from dynamo_lite.protocol import DisaggregationStrategy, Role
from dynamo_lite.router.settings import RouterSettings
from dynamo_lite.runtime.config import RuntimeSettings, Timeouts
from dynamo_lite.worker import __main__ as worker_cli
from dynamo_lite.worker.worker import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
CLIS = [
    ROOT / "dynamo_lite" / "worker" / "__main__.py",
    ROOT / "dynamo_lite" / "frontend" / "__main__.py",
    ROOT / "dynamo_lite" / "serve.py",
    ROOT / "dynamo_lite" / "runtime" / "cli.py",
    ROOT / "dynamo_lite" / "placement" / "cli.py",
]
# Flag defaults that are not settings: what a flag means when it is omitted, in the CLI's own terms.
OWN_DEFAULTS = {
    ("serve.py", "--topology"): "disagg",  # which workers serve starts, not a setting of any of them
    ("serve.py", "--threads"): 0,  # 0: this machine's cores split between serve's workers (see serve.py)
}


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags bound to environment variables read them as their defaults: none set here."""
    for name in list(os.environ):
        if name.startswith(("DYN_", "ETCD_", "NATS_")) or name == "DYNAMO_LITE_API_KEY":
            monkeypatch.delenv(name)


def _literal_default(value: ast.expr) -> ast.Constant | None:
    """The literal a flag's default comes down to: the default itself, or the fallback of an environment
    variable it is bound to (``os.environ.get("DYN_LOG", "INFO")``, ``os.getenv(...)``, nested ones)."""
    if isinstance(value, ast.Constant):
        return value
    if isinstance(value, ast.Call) and len(value.args) == 2:
        func = value.func
        name = ast.unparse(func)
        if name in ("os.environ.get", "os.getenv", "environ.get", "getenv"):
            return _literal_default(value.args[1])
    return None


def flag_defaults(path: Path) -> list[tuple[str, object]]:
    """(flag, default) of every ``add_argument`` call in ``path`` whose default is a literal, or an environment
    variable's with a literal fallback."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
            continue
        flag = next((a.value for a in node.args if isinstance(a, ast.Constant)), "?")
        for kw in node.keywords:
            literal = _literal_default(kw.value) if kw.arg == "default" else None
            if literal is not None:
                found.append((flag, literal.value))
    return found


def test_hidden_defaults_are_found(tmp_path: Path) -> None:
    """The check below sees a default hidden behind an environment variable."""
    path = tmp_path / "cli.py"
    path.write_text(
        'p.add_argument("--log-level", default=os.environ.get("DYN_LOG", os.getenv("X", "INFO")))'
    )
    assert flag_defaults(path) == [("--log-level", "INFO")]


@pytest.mark.parametrize("path", CLIS, ids=lambda p: p.name)
def test_clis_restate_no_default(path: Path) -> None:
    """A literal default in a CLI may only be None or "" (not given), or one of its own, listed above."""
    for flag, value in flag_defaults(path):
        if value in (None, "") or OWN_DEFAULTS.get((path.name, flag)) == value:
            continue
        raise AssertionError(
            f"{path.name}: {flag} restates a default ({value!r}); read it from a settings object"
        )


def test_the_worker_cli_without_flags_is_the_settings_defaults() -> None:
    settings = worker_cli.settings_from(worker_cli.build_parser().parse_args([]))
    # The CLI records which engine flags were given (none): the TensorRT-LLM engine passes only those.
    assert settings == WorkerSettings(engine_settings=EngineSettings(explicit=frozenset()))
    given = worker_cli.build_parser().parse_args(
        ["--drain-timeout", "7", "--kv-lease", "9", "--max-batch-size", "4"]
    )
    settings = worker_cli.settings_from(given)
    assert settings.runtime.timeouts == Timeouts(drain_s=7.0)
    assert settings.engine_settings.kv_lease_s == 9.0 and settings.engine_settings.max_batch_size == 4
    assert settings.engine_settings.explicit == {"kv_lease_s", "max_batch_size"}


def test_a_decode_first_worker_takes_the_routers_placement_flags() -> None:
    flags = ["--mode", "decode", "--disaggregation-strategy", "decode_first", "--router-mode", "least-loaded"]
    settings = worker_cli.settings_from(
        worker_cli.build_parser().parse_args([*flags, "--queue-timeout", "5"])
    )
    assert settings.disaggregation_strategy is DisaggregationStrategy.DECODE_FIRST
    assert settings.placement == PlacementSettings(policy="least-loaded", timeouts=Timeouts(queue_s=5.0))
    assert settings.placement.timeouts is settings.runtime.timeouts  # one timeouts object per process
    router = frontend_cli.parse_args(["--router-mode", "least-loaded", "--queue-timeout", "5"]).router
    assert router == RouterSettings(policy="least-loaded", timeouts=Timeouts(queue_s=5.0))


def test_the_frontend_cli_without_flags_is_the_settings_defaults() -> None:
    process = frontend_cli.parse_args([])
    assert process.frontend == FrontendSettings(http_host=frontend_cli.HTTP_HOST)
    assert process.router == RouterSettings()
    assert process.runtime == RuntimeSettings()
    # One timeouts object for the whole process, read from its flags.
    process = frontend_cli.parse_args(["--first-token-timeout", "60", "--queue-timeout", "5"])
    assert process.frontend.timeouts is process.router.timeouts is process.runtime.timeouts
    assert process.router.timeouts == Timeouts(first_token_s=60.0, queue_s=5.0)


def test_serve_without_flags_differs_from_the_settings_defaults_only_where_it_says_why() -> None:
    process = serve.parse_args([])
    timeouts = Timeouts(drain_s=serve.SERVE_DRAIN_S)
    assert process.frontend == FrontendSettings(timeouts=timeouts)
    assert process.router == RouterSettings(timeouts=timeouts)
    threads = max(1, (os.cpu_count() or 2) // 2)
    assert process.workers == [
        WorkerSettings(
            role=role,
            engine=serve.SERVE_ENGINE,
            stream_interval_s=serve.SERVE_STREAM_INTERVAL_S,
            engine_settings=EngineSettings(
                role=role, threads=threads, alone_threads=(os.cpu_count() or 2) if role == Role.PREFILL else 0
            ),
            runtime=RuntimeSettings.embedded(timeouts=timeouts),
        )
        for role in (Role.PREFILL, Role.DECODE)
    ]


def test_environment_variables_are_read_by_the_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_NAMESPACE", "from-env")
    monkeypatch.setenv("ETCD_ENDPOINTS", "10.0.0.1:2379")
    monkeypatch.setenv("DYNAMO_LITE_API_KEY", "k")
    process = frontend_cli.parse_args([])
    assert (process.runtime.namespace, process.runtime.etcd_endpoints) == ("from-env", "10.0.0.1:2379")
    assert process.frontend.api_key == "k"
    worker = worker_cli.settings_from(worker_cli.build_parser().parse_args(["--namespace", "flag"]))
    assert worker.runtime.namespace == "flag"  # a flag wins over its variable


def test_the_http_api_flags_reach_frontend_and_serve_alike() -> None:
    flags = [
        "--api-key", "k", "--allow-unknown-fields", "--allowed-origins", "http://a", "http://b",
        "--tls-cert-path", "c.pem", "--tls-key-path", "k.pem",
    ]  # fmt: skip
    expected = {
        "api_key": "k",
        "allow_unknown_fields": True,
        "allowed_origins": ("http://a", "http://b"),
        "tls_cert_path": "c.pem",
        "tls_key_path": "k.pem",
    }
    for settings in (frontend_cli.parse_args(flags).frontend, serve.parse_args(flags).frontend):
        assert {name: getattr(settings, name) for name in expected} == expected
    with pytest.raises(SystemExit):
        serve.parse_args(["--tls-cert-path", "c.pem"])
