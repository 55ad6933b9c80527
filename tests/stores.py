"""Real Redis and Memcached servers for the session tests, each on a free 127.0.0.1 port with its own
directory and no persistence; installed with apt-get (as root) when missing, as CI machines start bare."""
from __future__ import annotations

import os
import socket

from procs import Proc, Processes, ensure_debian_tool, free_port, port_open, wait_until


def start_redis(procs: Processes, directory: str, port: int | None = None) -> tuple[Proc, int]:
    """redis-server on 127.0.0.1:port (a free one by default), no snapshots, no AOF."""
    program = ensure_debian_tool("redis-server", "redis-server")
    port = port or free_port()
    proc = procs.start([program, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", directory, "--daemonize", "no",
                        "--protected-mode", "no", "--logfile", ""], "redis")
    proc.wait_for_line(r"Ready to accept connections")
    wait_until(lambda: port_open(port), what=f"redis on {port}")
    return proc, port


def start_memcached(procs: Processes, port: int | None = None) -> tuple[Proc, int]:
    program = ensure_debian_tool("memcached", "memcached")
    port = port or free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []      # memcached refuses to run as root
    proc = procs.start([program, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "16", *user],
                       "memcached")
    wait_until(lambda: port_open(port), what=f"memcached on {port}")
    return proc, port


def redis_get(port: int, key: bytes) -> bytes | None:
    import redis
    with redis.Redis(host="127.0.0.1", port=port, socket_timeout=2) as client:
        return client.get(key)


def memcached_get(port: int, key: bytes) -> bytes | None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"get " + key + b"\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    if not data.startswith(b"VALUE"):
        return None
    header, _, rest = data.partition(b"\r\n")
    return rest[:int(header.split()[3])]
