"""Helpers for tests that run real processes on 127.0.0.1: start, wait for a line or a port, kill by PID.

Every process is started in its own session (its PID is its process group), so teardown kills it and
anything it forked (fastlb's workers) with one killpg, even when the test failed halfway.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKEND_SERVER = str(Path(__file__).with_name("backend_server.py"))
HTTP_BACKEND = str(Path(__file__).with_name("http_backend.py"))
DEFAULT_TIMEOUT = 10.0


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if "FASTLB_PURE_PYTHON" not in env:
        try:
            import fastlb._core  # noqa: F401
        except ImportError:
            env["FASTLB_PURE_PYTHON"] = "1"      # the compiled core is not built: use its twin
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def replace_file(path, text: str) -> None:
    """Writes a file a running fastlb watches the way operators must: a new file renamed over the old
    one. A rewrite in place can be read half-written (truncated, not yet filled) by the watcher."""
    path = Path(path)
    fresh = path.with_name(path.name + ".new")
    fresh.write_text(text)
    os.replace(fresh, path)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(condition, timeout: float = DEFAULT_TIMEOUT, what: str = "condition", interval: float = 0.02):
    """Polls condition() until it is truthy (returns its value) or fails the test after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Proc:
    """A started process whose combined stdout/stderr lines are collected by a reader thread."""

    def __init__(self, args: list[str], name: str, env: dict[str, str] | None = None, cwd=REPO) -> None:
        """env and cwd: the source tree's by default (tests/install/ runs an installed fastlb elsewhere)."""
        self.name = name
        self.args = args
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env or subprocess_env(), cwd=cwd,
                                      start_new_session=True, text=True, bufsize=1)
        self.pid = self.popen.pid
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    @property
    def output(self) -> str:
        with self.changed:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = DEFAULT_TIMEOUT, start: int = 0) -> re.Match:
        """The first output line from index `start` matching the regex pattern."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self.changed:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.popen.poll() is not None and not self.reader.is_alive()):
                    raise AssertionError(f"{self.name}: no line matching {pattern!r} within {timeout}s; "
                                         f"output:\n{chr(10).join(self.lines)}")
                self.changed.wait(min(remaining, 0.2))

    def wait_exit(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} (pid {self.pid}) still running after {timeout}s; "
                                 f"output:\n{self.output}") from None
        self.reader.join(2)
        return code

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL the process and everything in its process group; reap it."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.kill()
        except ProcessLookupError:
            pass
        self.popen.wait(5)
        self.reader.join(2)


class Processes:
    """Starts fastlb and backend processes for one test; `cleanup()` kills all of them."""

    def __init__(self) -> None:
        self.started: list[Proc] = []
        self.relay: str | None = None        # `--relay` for `--mode tcp` (conftest's tcp_relay fixture)

    def start(self, args: list[str], name: str, **options) -> Proc:
        proc = Proc(args, name, **options)
        self.started.append(proc)
        return proc

    def fastlb(self, *args: str, wait_port: int | None = None) -> Proc:
        """`python -m fastlb ARGS`; waits for the first --bind port to accept unless wait_port=0.

        `relay` (set by the tcp_relay fixture: "uvloop" or "epoll") runs every `--mode tcp` fastlb with
        that `--relay` unless it names one, so the L4 tests check every data path."""
        relay = self.relay
        if relay and "--relay" not in args and "--mode" in args and args[args.index("--mode") + 1] == "tcp":
            args = (*args, "--relay", relay)
        proc = self.start([sys.executable, "-m", "fastlb", *args], "fastlb")
        port = wait_port
        if port is None and "--bind" in args:
            port = int(args[args.index("--bind") + 1].split(",")[0].rsplit(":", 1)[1])
        if port:
            proc.wait_for_line(r"listening on")
            wait_until(lambda: port_open(port), what=f"fastlb on port {port}")
        return proc

    def backends(self, *names: str) -> tuple[Proc, dict[str, int]]:
        """One echo backend process serving each name on its own port: returns (proc, name -> port)."""
        ports = {name: free_port() for name in names}
        proc = self.start([sys.executable, BACKEND_SERVER, *(f"{n}:{p}" for n, p in ports.items())],
                          "backends")
        proc.wait_for_line(r"^ready$")
        return proc, ports

    def http_backends(self, *names: str) -> tuple[Proc, dict[str, int]]:
        """One HTTP test backend process (tests/http_backend.py) serving each name on its own port."""
        ports = {name: free_port() for name in names}
        proc = self.start([sys.executable, HTTP_BACKEND, *(f"{n}:{p}" for n, p in ports.items())],
                          "http-backends")
        proc.wait_for_line(r"^ready$")
        return proc, ports

    def cleanup(self) -> None:
        for proc in reversed(self.started):
            proc.kill()


def balancer_args(port: int, backends, *extra: str, mode: str = "tcp") -> list[str]:
    """fastlb's flags for one bind on 127.0.0.1:port in front of `backends`: ports, or
    'HOST:PORT[,options]' strings."""
    args = ["--mode", mode, "--bind", f"127.0.0.1:{port}"]
    for backend in backends:
        args += ["--backend", f"127.0.0.1:{backend}" if isinstance(backend, int) else backend]
    return [*args, *extra]


# ---- clients --------------------------------------------------------------------------------------

def connect(port: int, source_ip: str | None = None, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(timeout)
    if source_ip:
        sock.bind((source_ip, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_line(sock: socket.socket, limit: int = 4096) -> bytes:
    """Reads up to and including the first newline (byte by byte: the rest stays in the socket)."""
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def backend_name(port: int, source_ip: str | None = None) -> str:
    """Connects through fastlb and returns the name line the backend sends first, then closes."""
    with connect(port, source_ip) as sock:
        return read_line(sock).decode().strip()


class LoadLoop:
    """A bounded client loop in a thread: records who answered and every failure, with the time.
    Subclasses give `_run`, which stops at `stop()` or at `deadline`."""

    def __init__(self, port: int, max_seconds: float, join_timeout: float) -> None:
        self.port = port
        self.deadline = time.monotonic() + max_seconds
        self.join_timeout = join_timeout
        self.answers: list[tuple[float, str]] = []      # (monotonic time, backend name)
        self.failures: list[tuple[float, str]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def _run(self) -> None:
        raise NotImplementedError

    def first_answer_by(self, name: str, since: float = 0.0) -> float | None:
        """When `name` first answered at or after `since` (monotonic), or None."""
        for t, n in self.answers[:]:
            if t >= since and n == name:
                return t
        return None

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(self.join_timeout)


class ConnectionLoad(LoadLoop):
    """A client loop in a thread: new connection after new connection through `port`, each reading the
    echo backend's name line, sending a line and reading its echo. Records who answered and every
    failure. Bounded: it stops at `stop()` or after `max_seconds`.

    `between_connections()` holds the loop between two connections, so a test can kill a backend
    without cutting a connection in flight (which no balancer can save): what is measured is whether
    *new* connections fail."""

    def __init__(self, port: int, max_seconds: float = 60.0, connect_timeout: float = 3.0) -> None:
        super().__init__(port, max_seconds, join_timeout=10)
        self.connect_timeout = connect_timeout
        self.gate = threading.Lock()

    def _run(self) -> None:
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            with self.gate:
                try:
                    with connect(self.port, timeout=self.connect_timeout) as sock:
                        name = read_line(sock).decode().strip()
                        sock.sendall(b"ping\n")
                        echo = read_line(sock)
                    if not name or echo != b"ping\n":
                        raise ConnectionError(f"short answer: name {name!r}, echo {echo!r}")
                    self.answers.append((time.monotonic(), name))
                except OSError as exc:
                    self.failures.append((time.monotonic(), f"{exc.__class__.__name__}: {exc}"))

    def between_connections(self):
        return self.gate


def ensure_debian_tool(command: str, package: str) -> str:
    """The path of `command`, installing Debian's `package` with apt-get when it is missing (the tests
    run as root on Debian, like CI). Fails the test, never skips it, when that is not possible."""
    path = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
    if path:
        return path
    # Debian starts a package's service on install unless policy-rc.d says no: the tests want none.
    policy = "/usr/sbin/policy-rc.d"
    had_policy = os.path.exists(policy)
    if not had_policy:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
            result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
            if result.returncode:
                raise AssertionError(f"{command} is missing and `{' '.join(args)}` failed:\n{result.stderr}")
    finally:
        if not had_policy:
            os.unlink(policy)
    path = shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")
    assert path, f"{package} installed but {command} not found"
    return path
