"""What the C relay (`--relay epoll`, given explicitly) has to prove beyond the L4 tests that every data
path runs (test_l4.py): byte-exact transfers with half-close, and no file descriptor left behind."""
import hashlib
import os
import socket
import threading

from procs import balancer_args, free_port, wait_until


def _echo_server(sock):
    def serve(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _round_trip(port, size):
    data = os.urandom(size)
    got = []
    with socket.create_connection(("127.0.0.1", port)) as conn:
        reader = threading.Thread(target=lambda: got.extend(iter(lambda: conn.recv(65536), b"")))
        reader.start()
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)          # half-close: the echo still flows back
        reader.join(60)
    return hashlib.sha256(b"".join(got)).digest() == hashlib.sha256(data).digest()


def fastlb_idle(pid):
    """No TCP socket of the process is connected (only the listening one and the event loop's fds)."""
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
              if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")}
    with open(f"/proc/{pid}/net/tcp") as table:
        states = [line.split() for line in table.readlines()[1:]]
    return not any(row[9] in inodes and row[3] != "0A" for row in states)     # 0A: LISTEN


def test_epoll_relay_is_byte_exact_and_leaks_no_fd(procs):
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=_echo_server, args=(listener,), daemon=True).start()
    try:
        port = free_port()
        fastlb = procs.fastlb(*balancer_args(port, [f"127.0.0.1:{listener.getsockname()[1]}"],
                                          "--relay", "epoll"))
        assert len(os.listdir(f"/proc/{fastlb.pid}/task")) == 2          # the loop and the relay thread
        fds = lambda: len(os.listdir(f"/proc/{fastlb.pid}/fd"))
        # The start-up probe's connection may still be open: count once a first connection has ended.
        assert _round_trip(port, 1024)
        wait_until(lambda: fds() == fds() and fastlb_idle(fastlb.pid), what="the first connection closed")
        before = fds()
        assert _round_trip(port, 32 << 20)
        results = []
        threads = [threading.Thread(target=lambda: results.append(_round_trip(port, 2 << 20)))
                   for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert results == [True] * 16
        wait_until(lambda: fds() == before, what="fastlb's fds back to their count before the test")
    finally:
        listener.close()
