"""``python -m dynamo_lite.frontend --workers N``: N frontend processes on one port, and the process that keeps them.

The supervisor binds the port first with SO_REUSEPORT and never listens on it: the port is taken (a clash fails
here, at once) and concrete (``--http-port 0`` becomes one port for all). Each child is a whole frontend (its own
etcd watch, router view and NATS connection) started with the same flags plus ``--http-port PORT
--supervisor-dir DIR``; it binds the port with SO_REUSEPORT and the kernel spreads new connections among the
children. DIR is a temporary directory the supervisor owns (the children's metrics sockets, see
``sibling_metrics``) and removes at exit.

The supervisor prints ``READY frontend URL`` once every child is ready, forwards SIGTERM/SIGINT to the children
(each drains as a lone frontend does) and exits when they have; a child that dies otherwise is restarted with
backoff. It exits 1 when a child fails before the frontend was ever ready (a bad flag, etcd or NATS unreachable:
the same error in every child), or when one keeps dying before it gets ready. Children are known by PID only,
each in a session of its own (see ``_spawn``); on Linux each also gets SIGTERM if the supervisor itself dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dynamo_lite.frontend.settings import FrontendSettings

log = logging.getLogger("dynamo_lite.frontend.supervisor")

READY = "READY frontend"


@dataclass(frozen=True, slots=True)
class Restarts:
    """How the supervisor restarts a child that died."""

    backoff_s: float = 0.5  # first wait before a restart; doubles per restart, up to backoff_max_s
    backoff_max_s: float = 10.0
    stable_s: float = 30.0  # a child up this long has its slot's backoff reset
    max_start_failures: int = 5  # children of one slot in a row that die before ready: give up, exit 1
    stop_grace_s: float = 10.0  # on top of the children's --shutdown-timeout, then SIGKILL


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT that never listens: it holds the port for the children.

    A port someone else holds is refused, even one held with SO_REUSEPORT (which the kernel would let this user
    share: two frontends would then split one port's connections).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port != 0:
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # as a lone frontend binds: fails if taken
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _death_signal() -> Callable[[], None] | None:
    """On Linux, a function for the child between fork and exec: SIGTERM to it when the supervisor dies.
    Looked up here, in the parent, so that the child only makes the call (no import, no lock to take)."""
    if sys.platform != "linux":
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


class Supervisor:
    """Starts ``settings.workers`` children, ``program`` with ``argv`` (the frontend's own flags), and keeps them
    running."""

    def __init__(
        self,
        argv: list[str],
        settings: FrontendSettings,
        port: int,
        directory: Path,
        restarts: Restarts,
        program: tuple[str, ...] = (sys.executable, "-m", "dynamo_lite.frontend"),
    ) -> None:
        self._program = program
        self._death_signal = _death_signal()
        self._argv = argv
        self._settings = settings
        self._port = port
        self._dir = directory
        self._restarts = restarts
        self._procs: dict[int, asyncio.subprocess.Process] = {}  # slot → its current child
        self._ready: set[int] = set()  # slots whose current child is ready
        self._announced = False
        self._stop = asyncio.Event()
        self._failed = False

    @property
    def url(self) -> str:
        scheme = "https" if self._settings.tls else "http"
        return f"{scheme}://{self._settings.http_host}:{self._port}"

    def child_pids(self) -> list[int]:
        return [p.pid for p in self._procs.values() if p.returncode is None]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        slots = [
            asyncio.create_task(self._keep(i), name=f"frontend-{i}") for i in range(self._settings.workers)
        ]
        await self._stop.wait()
        await self._stop_children(slots)
        return 1 if self._failed else 0

    async def _spawn(self, slot: int) -> asyncio.subprocess.Process:
        cmd = [*self._program, *self._argv]
        cmd += ["--http-port", str(self._port), "--supervisor-dir", str(self._dir)]
        # A session of its own: where the kernel shares CPU among sessions (autogroup scheduling, on by default
        # for processes outside a CPU cgroup), N children weigh as N frontends would, not as one. Signals from
        # the terminal reach the supervisor, which forwards them; if it dies, the children get SIGTERM.
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            preexec_fn=self._death_signal,
            start_new_session=True,
        )
        self._procs[slot] = proc
        return proc

    async def _keep(self, slot: int) -> None:
        """Run slot ``slot``'s child; restart it when it dies, until stopping (or giving up)."""
        r = self._restarts
        backoff, start_failures = r.backoff_s, 0
        while not self._stop.is_set():
            proc = await self._spawn(slot)
            if self._stop.is_set():  # stopped while it was starting
                proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            was_ready = await self._follow(slot, proc)
            code = await proc.wait()
            self._ready.discard(slot)
            with contextlib.suppress(OSError):  # a killed child leaves its metrics socket behind
                (self._dir / f"{proc.pid}.sock").unlink()
            if self._stop.is_set():
                return
            if not self._announced:
                log.error("frontend process %d (pid %d) exited with %s while starting", slot, proc.pid, code)
                return self._give_up()
            start_failures = 0 if was_ready else start_failures + 1
            if start_failures >= r.max_start_failures:
                log.error("frontend process %d died %d times before getting ready", slot, start_failures)
                return self._give_up()
            if time.monotonic() - started >= r.stable_s:
                backoff = r.backoff_s
            log.warning(
                "frontend process %d (pid %d) exited with %s after %.1f s; restarting in %.1f s",
                slot,
                proc.pid,
                code,
                time.monotonic() - started,
                backoff,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            backoff = min(2 * backoff, r.backoff_max_s)

    def _give_up(self) -> None:
        self._failed = True
        self._stop.set()

    async def _follow(self, slot: int, proc: asyncio.subprocess.Process) -> bool:
        """Pass the child's stdout through, except its READY line; until it closes. Whether it got ready."""
        assert proc.stdout is not None
        ready = False
        async for line in proc.stdout:
            if not ready and line.startswith(READY.encode()):
                ready = True
                self._child_ready(slot, proc.pid)
                continue
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
        return ready

    def _child_ready(self, slot: int, pid: int) -> None:
        self._ready.add(slot)
        if self._announced:
            log.info("frontend process %d restarted: pid %d", slot, pid)
        elif len(self._ready) == self._settings.workers:
            self._announced = True
            pids = ", ".join(str(p) for p in self.child_pids())
            log.info("%d frontend processes on port %d: pids %s", self._settings.workers, self._port, pids)
            print(f"{READY} {self.url}", flush=True)

    async def _stop_children(self, slots: list[asyncio.Task]) -> None:
        """SIGTERM to every child (they drain), SIGKILL after the grace period; then the slots end."""
        for proc in self._procs.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        grace = self._settings.timeouts.shutdown_s + self._restarts.stop_grace_s
        _, late = await asyncio.wait(slots, timeout=grace)
        if late:
            for proc in self._procs.values():
                if proc.returncode is None:
                    log.warning(
                        "frontend pid %d still running %.0f s after SIGTERM: SIGKILL", proc.pid, grace
                    )
                    proc.kill()
            await asyncio.wait(late)
        for task in slots:
            if not task.cancelled() and task.exception() is not None:
                log.error("supervising a frontend process failed", exc_info=task.exception())
                self._failed = True


def supervise(argv: list[str], settings: FrontendSettings, restarts: Restarts | None = None) -> int:
    """Run ``settings.workers`` frontend processes with ``argv`` until SIGTERM/SIGINT; the exit status."""
    try:
        held = reserve_port(settings.http_host, settings.http_port)
    except OSError as e:
        print(f"error: can't bind {settings.http_host}:{settings.http_port}: {e}", file=sys.stderr)
        return 1
    directory = Path(tempfile.mkdtemp(prefix="dynamo_lite-frontend-"))
    try:
        supervisor = Supervisor(argv, settings, held.getsockname()[1], directory, restarts or Restarts())
        return asyncio.run(supervisor.run())
    finally:
        held.close()
        shutil.rmtree(directory, ignore_errors=True)
