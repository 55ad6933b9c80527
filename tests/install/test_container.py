"""The container image (Dockerfile, docker/build-image.sh): built here offline on a local Debian base,
it runs fastlb with its C engine in front of backends on the host, reports healthy through the admin
/healthz, and `docker stop` drains: no request fails before the stop, the one in flight is answered,
and the container exits 0.

Docker is installed and dockerd started when missing (and stopped again); the test is skipped only
where dockerd cannot run at all."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from http_client import Client, KeepAliveLoad, requests_seen
from procs import REPO, Proc, ensure_debian_tool, free_port, port_open, wait_until

IMAGE = "fastlb:test"
DOCKERD_START_TIMEOUT = 60
BUILD_TIMEOUT = 1800            # a first build: debootstrap, Debian's compiler and Python, the extensions
STOP_TIMEOUT = 30               # docker stop's grace before SIGKILL: longer than fastlb's below
GRACE_PERIOD = "20s"
SLOW_MS = 1500                  # a request in flight when docker stop comes
LOAD_BEFORE_STOP = 200          # requests answered before the stop


def docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def docker_answers() -> bool:
    try:
        return docker("info", timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.fixture(scope="module")
def image(built):
    """Builds the image with docker/build-image.sh (docker's layer cache and the base image, kept by
    name, make a rebuild of the same source quick); yields (name, size in bytes)."""
    ensure_debian_tool("dockerd", "docker.io")
    ensure_debian_tool("debootstrap", "debootstrap")
    dockerd = None
    if not docker_answers():
        dockerd = Proc([ensure_debian_tool("dockerd", "docker.io")], "dockerd", cwd="/")
        try:
            wait_until(docker_answers, timeout=DOCKERD_START_TIMEOUT, what="dockerd", interval=0.5)
        except AssertionError:
            dockerd.kill()
            pytest.skip(f"Docker cannot run here: dockerd did not start; its output:\n{dockerd.output[-3000:]}")
    try:
        started = time.monotonic()
        build = subprocess.run(["bash", str(REPO / "docker" / "build-image.sh")], capture_output=True, text=True,
                               env=dict(os.environ, IMAGE=IMAGE, PYTHON=sys.executable), timeout=BUILD_TIMEOUT)
        assert build.returncode == 0, f"build-image.sh failed:\n{build.stdout}\n{build.stderr[-6000:]}"
        size = int(docker("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout)
        print(f"\nimage {IMAGE}: built in {time.monotonic() - started:.0f}s, {size / 1e6:.0f} MB")
        yield IMAGE, size
    finally:
        if dockerd is not None:
            dockerd.signal(signal.SIGTERM)
            try:
                dockerd.wait_exit(30)
            except AssertionError:
                dockerd.kill()


@pytest.fixture
def container():
    """A container name; the container is removed after the test, whatever happened."""
    name = f"fastlb-test-{os.getpid()}-{free_port()}"
    yield name
    docker("rm", "-f", name)


def test_image_balances_reports_healthy_and_docker_stop_drains(image, container, procs):
    name, _ = image
    backends, ports = procs.http_backends("a", "b")
    port, admin = free_port(), free_port()
    started = docker("run", "-d", "--name", container, "--network", "host", "--health-interval", "1s",
                     name, "--bind", f"127.0.0.1:{port}",
                     *(f"--backend=127.0.0.1:{p}" for p in ports.values()),
                     "--admin", f"127.0.0.1:{admin}", "--grace-period", GRACE_PERIOD)
    assert started.returncode == 0, started.stderr
    logs = procs.start(["docker", "logs", "-f", container], "container-log", cwd="/")
    logs.wait_for_line(rf"127\.0\.0\.1:{port}: HTTP engine c$", timeout=30)
    logs.wait_for_line(r"listening on")
    wait_until(lambda: port_open(port), what="fastlb in the container")
    assert docker("exec", container, "id", "-un").stdout.strip() == "fastlb"       # not root
    health = lambda: docker("inspect", "--format", "{{.State.Health.Status}}", container).stdout.strip()  # noqa: E731
    wait_until(lambda: health() == "healthy", timeout=30, what="the health check through /healthz", interval=0.5)

    load = KeepAliveLoad(port, max_seconds=60).start()
    slow: dict = {}
    in_flight = threading.Thread(target=lambda: slow.update(answer=slow_request(port)), daemon=True)
    try:
        wait_until(lambda: len(load.answers) >= LOAD_BEFORE_STOP or load.failures, what="load through the container")
        mark = len(backends.lines)
        in_flight.start()
        wait_until(lambda: any(r["url"].startswith("/slow") for r in requests_seen(backends, mark)),
                   what="the slow request at a backend")
        stop_at = time.monotonic()
        stopped = docker("stop", "-t", str(STOP_TIMEOUT), container, timeout=STOP_TIMEOUT + 30)
    finally:
        load.stop()
    in_flight.join(10)
    assert stopped.returncode == 0, stopped.stderr
    failed_before = [f for f in load.failures if f[0] < stop_at]
    assert not failed_before, f"requests failed before docker stop: {failed_before[:5]}"
    assert len(load.answers) >= LOAD_BEFORE_STOP
    assert slow.get("answer") == (200, b"slow\n"), f"the request in flight at the stop: {slow}"
    assert docker("inspect", "--format", "{{.State.ExitCode}}", container).stdout.strip() == "0", logs.output
    logs.wait_exit()
    assert "draining" in logs.output and "Traceback" not in logs.output


def slow_request(port: int) -> tuple[int, bytes]:
    client = Client(port, timeout=10)
    try:
        response = client.request("GET", f"/slow?ms={SLOW_MS}")
        return response.status, response.body
    finally:
        client.close()
