"""Real Redis and Memcached servers for the session tests, each on a free 127.0.0.1 port with its own
directory and no persistence; installed with apt-get (as root) when missing, as CI machines start bare."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess

from procs import Proc, Processes, free_port, port_open, wait_until


def ensure_installed(program: str, package: str) -> str:
    path = shutil.which(program)
    if path:
        return path
    if os.geteuid() != 0:
        raise RuntimeError(f"{program} is missing and only root can install it: apt-get install {package}")
    # Debian starts a package's service on install unless policy-rc.d says no: the tests want none.
    policy = "/usr/sbin/policy-rc.d"
    had_policy = os.path.exists(policy)
    if not had_policy:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        if subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, timeout=300,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, timeout=300, stdout=subprocess.DEVNULL)
            subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, timeout=300, check=True,
                           stdout=subprocess.DEVNULL)
    finally:
        if not had_policy:
            os.unlink(policy)
    path = shutil.which(program)
    if not path:
        raise RuntimeError(f"{program} still missing after apt-get install {package}")
    return path


def start_redis(procs: Processes, directory: str, port: int | None = None) -> tuple[Proc, int]:
    """redis-server on 127.0.0.1:port (a free one by default), no snapshots, no AOF."""
    program = ensure_installed("redis-server", "redis-server")
    port = port or free_port()
    proc = procs.start([program, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", directory, "--daemonize", "no",
                        "--protected-mode", "no", "--logfile", ""], "redis")
    proc.wait_for_line(r"Ready to accept connections")
    wait_until(lambda: port_open(port), what=f"redis on {port}")
    return proc, port


def start_memcached(procs: Processes, port: int | None = None) -> tuple[Proc, int]:
    program = ensure_installed("memcached", "memcached")
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
