"""Fixtures that start real services (etcd, nats-server) and real dynamo_lite processes on loopback.

Every process is started with its own free port and data dir, and killed by PID afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Every process the suite starts inherits this marker; at the end, any live process carrying it is a leak.
_SESSION_MARKER = "DYNAMO_LITE_TEST_SESSION"


def pytest_sessionstart(session: pytest.Session) -> None:
    os.environ[_SESSION_MARKER] = f"{os.getpid()}-{time.time_ns()}"


def _leaked_processes() -> list[tuple[int, str]]:
    """Live processes (not this one, not zombies) started with this session's marker."""
    marker = f"{_SESSION_MARKER}={os.environ.get(_SESSION_MARKER, '')}".encode()
    leaked = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if state == "Z":
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if int(ppid) == os.getpid() and "from multiprocessing." in cmd:
            continue  # Python's own helper (shared-memory resource tracker): it ends with this process
        leaked.append((int(entry.name), cmd))
    return leaked


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a test left a process behind (and stop them, by PID)."""
    if not os.environ.get(_SESSION_MARKER) or not Path("/proc").is_dir():
        return
    leaked = _leaked_processes()
    if not leaked:
        return
    for pid, _ in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    lines = "\n".join(f"  {pid}: {cmd[:200]}" for pid, cmd in leaked)
    session.config.get_terminal_writer().line(
        f"\nprocesses left running by the tests (killed now):\n{lines}", red=True
    )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Proc:
    """A child process we own: started with a log file, stopped by PID."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    port: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


@contextmanager
def killed_on_failure(proc: Proc) -> Iterator[Proc]:
    """For a helper that waits on the process it started: if the wait fails, the process goes with it."""
    try:
        yield proc
    except BaseException:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(5)
        raise


def spawn(name: str, cmd: list[str], tmp: Path, env: dict | None = None) -> Proc:
    log_path = tmp / f"{name}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log_path, "wb") as out:
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    return Proc(name, popen, log_path)


def _etcd_binary() -> str | None:
    return shutil.which("etcd")


def _nats_binary() -> str | None:
    return shutil.which("nats-server")


needs_services = pytest.mark.skipif(
    not (_etcd_binary() and _nats_binary()),
    reason="etcd and nats-server binaries are needed (apt-get install etcd-server nats-server)",
)


def start_etcd(tmp: Path, name: str = "etcd", port: int | None = None, peer_port: int | None = None) -> Proc:
    port = port or free_port()
    peer = peer_port or free_port()
    data = tmp / f"{name}-data"
    cmd = [
        _etcd_binary() or "etcd",
        "--name",
        name,
        "--data-dir",
        str(data),
        "--listen-client-urls",
        f"http://127.0.0.1:{port}",
        "--advertise-client-urls",
        f"http://127.0.0.1:{port}",
        "--listen-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-cluster",
        f"{name}=http://127.0.0.1:{peer}",
    ]
    proc = spawn(name, cmd, tmp, {"ETCD_UNSUPPORTED_ARCH": os.environ.get("ETCD_UNSUPPORTED_ARCH", "")})
    proc.port = port
    proc.extra["peer_port"] = peer

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as r:
                return b"true" in r.read()
        except OSError:
            return False

    with killed_on_failure(proc):
        wait_until(healthy, 15, what=f"etcd on {port}")
    return proc


def start_nats(
    tmp: Path, name: str = "nats", port: int | None = None, extra_args: list[str] | None = None
) -> Proc:
    port = port or free_port()
    proc = spawn(
        name, [_nats_binary() or "nats-server", "-a", "127.0.0.1", "-p", str(port), *(extra_args or [])], tmp
    )
    proc.port = port

    def listening() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    with killed_on_failure(proc):
        wait_until(listening, 10, what=f"nats-server on {port}")
    return proc


@dataclass
class Services:
    etcd: Proc
    nats: Proc
    tmp: Path

    @property
    def etcd_endpoints(self) -> str:
        return f"127.0.0.1:{self.etcd.port}"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats.port}"

    def runtime_args(self, namespace: str) -> list[str]:
        return [
            "--namespace",
            namespace,
            "--etcd-endpoints",
            self.etcd_endpoints,
            "--nats-url",
            self.nats_url,
        ]


@contextmanager
def _running_services(tmp: Path) -> Iterator[Services]:
    if not (_etcd_binary() and _nats_binary()):
        pytest.skip("etcd and nats-server binaries are needed (apt-get install etcd-server nats-server)")
    etcd = start_etcd(tmp)
    with killed_on_failure(etcd):
        nats = start_nats(tmp)
    services = Services(etcd, nats, tmp)
    try:
        yield services
    finally:
        # A test that restarts a service replaces it in ``services``: stop the first ones and the last ones.
        for p in {id(p): p for p in (nats, etcd, services.nats, services.etcd)}.values():
            p.kill()
            p.popen.wait(5)


@pytest.fixture
def procs_to_stop() -> Iterator[list[Proc]]:
    """Processes a test starts (workers, frontends): killed and reaped when it ends, passed or failed."""
    procs: list[Proc] = []
    yield procs
    for p in procs:
        p.kill()
    for p in procs:
        p.popen.wait(10)


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    """A fresh etcd and nats-server for one test."""
    with _running_services(tmp_path) as running:
        yield running


@pytest.fixture(scope="module")
def module_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """One etcd and nats-server for a whole test module: for stacks that several of its tests share."""
    with _running_services(tmp_path_factory.mktemp("services")) as running:
        yield running


def start_worker(
    services: Services,
    namespace: str,
    mode: str,
    *args: str,
    engine: str = "mocker",
    name: str | None = None,
    ready_timeout: float = 60.0,
    launch: tuple[str, ...] = (),
) -> Proc:
    """A worker process (``launch``: a module that runs it, e.g. ``("tests.e2e.next_wire",)``)."""
    name = name or f"worker-{mode}-{free_port()}"
    cmd = [
        sys.executable,
        "-m",
        *launch,
        "dynamo_lite.worker",
        "--mode",
        mode,
        "--engine",
        engine,
        "--metrics-port",
        "0",
        *services.runtime_args(namespace),
        *args,
    ]
    proc = spawn(name, cmd, services.tmp)

    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{name} exited early:\n{proc.log()[-3000:]}")
        return "READY worker" in proc.log()

    with killed_on_failure(proc):
        wait_until(ready, ready_timeout, what=f"{name} ready")
    line = next(ln for ln in proc.log().splitlines() if ln.startswith("READY worker"))
    parts = dict(p.split("=", 1) for p in line.split()[3:])
    proc.extra["instance_id"] = line.split()[2]
    proc.port = int(parts["metrics_port"])
    return proc


def start_frontend(
    services: Services, namespace: str, *args: str, ready_timeout: float = 30.0, launch: tuple[str, ...] = ()
) -> Proc:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        *launch,
        "dynamo_lite.frontend",
        "--http-host",
        "127.0.0.1",
        "--http-port",
        str(port),
        *services.runtime_args(namespace),
        *args,
    ]
    proc = spawn(f"frontend-{port}", cmd, services.tmp)
    proc.port = port

    def live() -> bool:
        if not proc.alive():
            raise RuntimeError(f"frontend exited early:\n{proc.log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/live", timeout=0.5) as r:
                return r.status == 200
        except OSError:
            return False

    with killed_on_failure(proc):
        wait_until(live, ready_timeout, what="frontend /live")
    return proc


# ---- for tests that kill and restart services and processes (runtime, router, worker) ----------------------
# Test modules can't ``from conftest import ...`` reliably (several conftest.py files share that module
# name), so the helpers above reach them through these fixtures.


@dataclass
class Launcher:
    """Starts etcd, nats-server, Python scripts and workers in one tmp dir; kills what is left at teardown."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    def _own(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def etcd(self, name: str = "etcd", port: int | None = None, peer_port: int | None = None) -> Proc:
        """Same name (data dir) and ports as an earlier one: a restart that keeps the data."""
        return self._own(start_etcd(self.tmp, name, port, peer_port))

    def nats(self, name: str = "nats", port: int | None = None) -> Proc:
        return self._own(start_nats(self.tmp, name, port))

    def python(self, name: str, script: str, *args: str, ready: str = "READY", timeout: float = 30.0) -> Proc:
        """Run ``script`` (source text) in a fresh interpreter; wait until its output shows ``ready``."""
        path = self.tmp / f"{name}.py"
        path.write_text(script)
        proc = self._own(spawn(name, [sys.executable, str(path), *args], self.tmp))

        def started() -> bool:
            if not proc.alive():
                raise RuntimeError(f"{name} exited early:\n{proc.log()[-3000:]}")
            return ready in proc.log()

        wait_until(started, timeout, what=f"{name} ready")
        return proc

    def worker(self, services: Services, namespace: str, mode: str, *args: str) -> Proc:
        return self._own(start_worker(services, namespace, mode, *args))

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            try:
                proc.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    if not (_etcd_binary() and _nats_binary()):
        pytest.skip("etcd and nats-server binaries are needed (apt-get install etcd-server nats-server)")
    launch = Launcher(tmp_path)
    try:
        yield launch
    finally:
        launch.close()


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """One nats-server for a test module (tests that kill NATS start their own with ``launcher``)."""
    if not _nats_binary():
        pytest.skip("nats-server binary is needed (apt-get install nats-server)")
    launch = Launcher(tmp_path_factory.mktemp("nats"))
    try:
        yield launch.nats()
    finally:
        launch.close()


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """One etcd for a test module (tests that kill etcd start their own with ``launcher``)."""
    if not _etcd_binary():
        pytest.skip("etcd binary is needed (apt-get install etcd-server)")
    launch = Launcher(tmp_path_factory.mktemp("etcd"))
    try:
        yield launch.etcd()
    finally:
        launch.close()


@pytest.fixture(scope="session")
def gpt_oss_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gpt-oss model folder without weights (config, o200k_harmony tokenizer, generation config), made by
    the project's own command."""
    from dynamo_lite.gpt_oss.tiny import write_model_folder

    return write_model_folder(tmp_path_factory.mktemp("gpt-oss") / "tiny-gpt-oss", metadata_only=True)
