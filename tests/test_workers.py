"""Worker processes, the supervising master, and graceful shutdown: real processes, real signals."""
import os
import signal
import socket

from procs import backend_name, connect, free_port, port_open, read_line, wait_until


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_master_restarts_a_killed_worker(procs):
    _, ports = procs.backends("a", "b")
    port = free_port()
    fastlb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                          "--backend", f"127.0.0.1:{ports['b']}", "--workers", "2")
    pids = {int(fastlb.wait_for_line(rf"worker {i} started \(pid (\d+)\)").group(1)) for i in (0, 1)}
    victim = min(pids)
    for pid in pids:
        wait_until(lambda: pid_alive(pid), what=f"worker {pid}")
    restarts_from = len(fastlb.lines)
    os.kill(victim, signal.SIGKILL)
    fastlb.wait_for_line(rf"\(pid {victim}\) killed by SIGKILL; restarting", start=restarts_from)
    replacement = int(fastlb.wait_for_line(r"worker \d started \(pid (\d+)\)", start=restarts_from).group(1))
    assert replacement not in pids
    wait_until(lambda: pid_alive(replacement), what="the replacement worker")
    fastlb.wait_for_line(rf"fastlb\[{replacement}\] worker \d: INFO listening on", start=restarts_from)
    # Every new connection is served, whichever worker the kernel hands it to.
    assert {backend_name(port) for _ in range(20)} == {"a", "b"}


def test_sigterm_drains_live_connections_then_exits(procs, tcp_relay):
    _, ports = procs.backends("a")
    port = free_port()
    fastlb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                          "--grace-period", "20s")
    with connect(port) as live:
        assert read_line(live) == b"a\n"
        fastlb.signal(signal.SIGTERM)
        fastlb.wait_for_line(r"draining \d+ connection")
        wait_until(lambda: not port_open(port), what="the listener to close")
        live.sendall(b"still here")                  # the live connection keeps working
        assert live.recv(64) == b"still here"
        assert fastlb.popen.poll() is None
    assert fastlb.wait_exit() == 0                  # it exits as soon as the last connection ended
    assert "grace period over" not in fastlb.output


def test_grace_period_cuts_connections_that_do_not_finish(procs, tcp_relay):
    _, ports = procs.backends("a")
    port = free_port()
    fastlb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                          "--grace-period", "300ms")
    with connect(port) as live:
        assert read_line(live) == b"a\n"
        fastlb.signal(signal.SIGTERM)
        assert fastlb.wait_exit() == 0
        try:
            data = live.recv(64)
        except ConnectionResetError:
            data = b""
        assert data == b""                           # reset or EOF: the relay is gone
    fastlb.wait_for_line(r"grace period over: closing 1 connection")


def test_master_sigterm_stops_every_worker(procs):
    _, ports = procs.backends("a")
    port = free_port()
    fastlb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['a']}",
                          "--workers", "2", "--grace-period", "2s")
    pids = [int(fastlb.wait_for_line(rf"worker {i} started \(pid (\d+)\)").group(1)) for i in (0, 1)]
    assert backend_name(port) == "a"
    fastlb.signal(signal.SIGTERM)
    assert fastlb.wait_exit() == 0
    for pid in pids:
        assert not pid_alive(pid)
    assert not port_open(port)


def test_an_address_in_use_fails_fast_with_workers(procs):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        fastlb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backend", "127.0.0.1:9", "--workers", "2",
                              wait_port=0)
        assert fastlb.wait_exit() == 1
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in fastlb.output
    finally:
        busy.close()
