"""The operator docs (docs/multi_node.md, deploy/k8s/README.md): their commands use flags that exist.

dynamo_lite's own commands are checked against the CLIs' ``--help``; etcd and nats-server commands against
the installed binaries' help (skipped where they are missing); relative links must lead to files.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess

import pytest
from deploy_testing import ROOT, help_flags

DOCS = [ROOT / "docs" / "multi_node.md", ROOT / "deploy" / "k8s" / "README.md"]
MODULES = ("dynamo_lite.worker", "dynamo_lite.frontend", "dynamo_lite.clear_namespace")
FLAG = r"(?<![\w-])--[a-z0-9][a-z0-9_-]*"


def commands(text: str) -> list[str]:
    """Shell commands of the fenced code blocks, continuation lines joined, comments dropped."""
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        out += [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines() if line.strip()]
    return [c for c in out if c and not c.startswith("#")]


def invocations(doc_text: str, program: str) -> list[str]:
    """The argument part of each call of ``program`` (up to a pipe, ``&&`` or ``;``)."""
    found = []
    for cmd in commands(doc_text):
        for m in re.finditer(rf"(?:^|\s){re.escape(program)}(\s.*)?$", cmd):
            found.append(re.split(r"\s(?:\||&&|;)\s", m.group(1) or "")[0])
    return found


@functools.cache
def binary_flags(binary: str) -> frozenset[str]:
    proc = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30)
    return frozenset(re.findall(FLAG, proc.stdout + proc.stderr))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_dynamo_lite_commands_use_existing_flags(doc):
    text = doc.read_text()
    calls = 0
    for module in MODULES:
        for args in invocations(text, f"-m {module}"):
            calls += 1
            unknown = set(re.findall(FLAG, args)) - help_flags(module)
            assert not unknown, f"{doc.name}: python -m {module} has no {sorted(unknown)}"
    if doc.name == "multi_node.md":
        assert calls >= 5


@pytest.mark.parametrize("binary", ["etcd", "nats-server"])
def test_service_commands_use_existing_flags(binary):
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed")
    known = binary_flags(path)
    assert "--help" in known or len(known) > 10
    text = (ROOT / "docs" / "multi_node.md").read_text()
    calls = invocations(text, binary)
    assert calls, f"no {binary} command in multi_node.md"
    for args in calls:
        unknown = set(re.findall(FLAG, args)) - known
        assert not unknown, f"{binary} has no {sorted(unknown)}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_lead_to_files(doc):
    for target in re.findall(r"\]\(([^)#\s]+)\)", doc.read_text()):
        if "://" in target:
            continue
        assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"


def test_docs_point_only_at_what_users_have():
    """The project's notes (shared/notes) stay with its developers: no doc or docstring sends a user there."""
    texts = [*ROOT.glob("*.md"), *(ROOT / "docs").rglob("*.md"), *(ROOT / "benchmarks").rglob("*.md")]
    texts += [*(ROOT / "dynamo_lite").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    pointing = [str(p.relative_to(ROOT)) for p in texts if "shared/notes" in p.read_text(errors="replace")]
    assert not pointing, f"these point into shared/notes, which users don't have: {pointing}"


def test_architecture_names_files_that_exist():
    """docs/architecture.md walks a request through the code: every file it names must exist."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    names = set(re.findall(r"`([\w./-]+\.(?:py|md|yaml|sh))`", text))
    names |= {n for n in re.findall(r"`(dynamo_lite/[\w/.-]+)`", text)}
    assert len(names) >= 15, sorted(names)
    package_files = {p.name for p in (ROOT / "dynamo_lite").rglob("*") if p.is_file()}
    missing = [
        n
        for n in sorted(names)
        if not (ROOT / n).exists()
        and not (ROOT / "dynamo_lite" / n).exists()
        and ("/" in n or n not in package_files)
    ]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
