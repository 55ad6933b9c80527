"""`--check grpc` against grpcio's own health service (grpcio-health-checking, tests/grpc_health_backend.py):
a service name (`check_service`), TLS to an ssl backend with its verify= and sni= settings, the status
flipping the backend down and up; the check settings' config errors."""
import sys
from pathlib import Path

import pytest

from fastlb.cli import config_from_args
from fastlb.config import ConfigError
from pki import CA
from procs import Processes, free_port, replace_file

pytest.importorskip("grpc_health.v1", reason="grpcio-health-checking not installed (the test extras)")
pytest.importorskip("fastlb.http2._nghttp2", reason="fastlb built without libnghttp2 (libnghttp2-dev)")

HEALTH_BACKEND = str(Path(__file__).with_name("grpc_health_backend.py"))
CHECK_FLAGS = ("--check", "grpc", "--check-interval", "0.2s", "--check-timeout", "2s", "--rise", "2", "--fall", "2")


def start_health_backend(processes: Processes, status_file: Path, *extra: str) -> int:
    port = free_port()
    processes.start([sys.executable, HEALTH_BACKEND, str(port), "--status-file", str(status_file), *extra],
                    f"grpc-health-{port}").wait_for_line(r"^ready$")
    return port


def flip_down_and_up(fastlb, address: str, status_file: Path) -> None:
    """The service's NOT_SERVING takes the backend down, SERVING brings it back: the check read the
    service's own status, through whatever transport the backend speaks."""
    replace_file(status_file, "NOT_SERVING")
    # "first check failed" when the flip beats the backend's first check (a loaded box).
    fastlb.wait_for_line(rf"backend {address} DOWN: (2 consecutive check failures|first check failed) "
                         rf"\(not SERVING\)")
    start = len(fastlb.output)
    replace_file(status_file, "SERVING")
    fastlb.wait_for_line(rf"backend {address} UP: 2 consecutive checks passed", start=start)


def test_the_named_service_status_flips_the_backend_while_the_whole_server_serves(tmp_path):
    status = tmp_path / "status"
    status.write_text("SERVING")
    processes = Processes()
    try:
        named = start_health_backend(processes, status)
        unknown = start_health_backend(processes, status)
        whole = start_health_backend(processes, status)
        fastlb = processes.fastlb(
            "--mode", "http", "--bind", f"127.0.0.1:{free_port()}", *CHECK_FLAGS,
            "--backend", f"127.0.0.1:{named},proto=h2,check-service=svc.A",
            "--backend", f"127.0.0.1:{unknown},proto=h2,check-service=svc.B",
            "--backend", f"127.0.0.1:{whole},proto=h2")
        # A service the server does not know: NOT_FOUND (grpc-status 5), never taken for healthy.
        fastlb.wait_for_line(rf"backend 127.0.0.1:{unknown} DOWN: .*\(grpc-status 5\)")
        flip_down_and_up(fastlb, f"127.0.0.1:{named}", status)
        # The check without a service asks about the whole server, which stayed SERVING all along.
        assert f"backend 127.0.0.1:{whole} DOWN" not in fastlb.output
    finally:
        processes.cleanup()


def test_the_check_speaks_tls_to_an_ssl_backend_verified_by_its_ca_and_sni(tmp_path):
    ca = CA(tmp_path, "health-ca")
    pem = ca.issue("backend", "grpc.test", ("grpc.test",))
    status = tmp_path / "status"
    status.write_text("SERVING")
    processes = Processes()
    try:
        port = start_health_backend(processes, status, "--tls", str(pem.with_suffix(".crt")),
                                    str(pem.with_suffix(".key")))
        other_ca = CA(tmp_path, "other-ca")
        trusted = f"127.0.0.1:{port},proto=h2,ssl,verify={ca.path},sni=grpc.test,check-service=svc.A"
        fastlb = processes.fastlb("--mode", "http", "--bind", f"127.0.0.1:{free_port()}", *CHECK_FLAGS,
                                  "--backend", trusted)
        flip_down_and_up(fastlb, f"127.0.0.1:{port}", status)
        # The backend's verify= is the check's too: a certificate from another CA fails it.
        untrusted = processes.fastlb("--mode", "http", "--bind", f"127.0.0.1:{free_port()}", *CHECK_FLAGS,
                                     "--backend", trusted.replace(str(ca.path), str(other_ca.path)))
        untrusted.wait_for_line(rf"backend 127.0.0.1:{port} DOWN: .*(certificate|CERTIFICATE)")
    finally:
        processes.cleanup()


# ---- config ----------------------------------------------------------------------------------------

def test_check_service_is_parsed_globally_and_per_backend():
    config = config_from_args(["--mode", "http", "--bind", "127.0.0.1:8", "--check", "grpc", "--check-service",
                               "svc.A", "--backend", "127.0.0.1:9,proto=h2",
                               "--backend", "127.0.0.1:10,proto=h2,check-service=svc.B"])[1]
    assert [config.health_for(b).check_service for b in config.backends] == ["svc.A", "svc.B"]


def test_check_service_applies_to_grpc_checks_only(tmp_path):
    with pytest.raises(ConfigError) as info:
        config_from_args(["--mode", "http", "--bind", "127.0.0.1:8", "--check", "http", "--check-service", "x",
                          "--backend", "127.0.0.1:9"])
    assert "--check-service: applies to grpc checks only; the check of 127.0.0.1:9 is 'http'" in str(info.value)
    path = tmp_path / "lb.toml"
    path.write_text('mode = "http"\nbind = "127.0.0.1:8"\ncheck = "tcp"\n\n[[backend]]\naddress = "127.0.0.1:9"\n'
                    'check_service = "svc.A"\n')
    with pytest.raises(ConfigError) as info:
        config_from_args(["--config", str(path)])
    assert str(info.value).startswith(f"{path}:7: backend[1].check_service: applies to grpc checks only")


def test_check_host_is_the_grpc_checks_authority_too():
    config = config_from_args(["--mode", "http", "--bind", "127.0.0.1:8", "--check", "grpc", "--check-host",
                               "health.internal", "--backend", "127.0.0.1:9,proto=h2"])[1]
    assert config.health_for(config.backends[0]).check_host == "health.internal"
    with pytest.raises(ConfigError) as info:
        config_from_args(["--mode", "http", "--bind", "127.0.0.1:8", "--check", "tcp", "--check-host", "h",
                          "--backend", "127.0.0.1:9"])
    assert "--check-host: applies to HTTP and grpc checks only" in str(info.value)


@pytest.mark.parametrize("service", ["", "svc.A", "s" * 200])      # 200: a two-byte length varint
def test_the_check_request_is_what_protobuf_encodes(service):
    from grpc_health.v1 import health_pb2

    from fastlb.http2.backend import health_check_request
    message = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    assert health_check_request(service) == b"\x00" + len(message).to_bytes(4, "big") + message
