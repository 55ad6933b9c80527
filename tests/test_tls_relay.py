"""TLS terminated by the C relay thread (`--mode tcp --relay epoll`, fastlb/_ctls.pxi): what it serves
itself (handshake, SNI certificate selection, ALPN, the protocol floor, resumption on any worker, bulk
transfers with backpressure, a backend that speaks first) and what stays on the event loop's TLS (client
certificates, TLS backends, `--relay uvloop`). Real fastlb processes, real TLS clients; each test runs with
the relay engine in its thread and inline (FASTLB_RELAY_INLINE)."""
import asyncio
import socket
import ssl
import signal
import subprocess
import sys
import time

import pytest

from procs import REPO, free_port, port_open, read_line, subprocess_env, wait_until
from test_ops import metric, metrics, retried_connects_counted, token_file  # noqa: F401
from test_tls import client_context, echo_roundtrip, pki, refused, s_client, subject_cn, tls_backends, tls_connect  # noqa: F401

NATIVE = "terminated by the relay thread"


@pytest.fixture(autouse=True, params=["thread", "inline"])
def relay_mode(request, monkeypatch):
    """Every test both ways: the relay engine in its own thread, and inline in the event loop's (what a
    worker pinned to one CPU runs)."""
    monkeypatch.setenv("FASTLB_RELAY_INLINE", "1" if request.param == "inline" else "0")
    return request.param


def native_lb(procs, pki, *bind_options, extra=(), backend_port):
    port = free_port()
    options = ",".join(bind_options)
    lb = procs.fastlb("--mode", "tcp", "--relay", "epoll", "--bind",
                      f"127.0.0.1:{port},ssl,cert={pki['default']}{',' + options if options else ''}",
                      "--backend", f"127.0.0.1:{backend_port}", *extra)
    return lb, port


def test_the_thread_terminates_plain_tls_binds(procs, pki):
    _, ports = procs.backends("a")
    lb, port = native_lb(procs, pki, backend_port=ports["a"])
    lb.wait_for_line(NATIVE)
    with tls_connect(port, client_context(pki), "default.test") as sock:
        assert subject_cn(sock) == "default.test"
        assert echo_roundtrip(sock) == "a"


@pytest.mark.parametrize("case", ["mtls", "tls-backend", "uvloop"])
def test_binds_the_thread_cannot_serve_stay_on_the_event_loop(procs, pki, case):
    port = free_port()
    bind = f"127.0.0.1:{port},ssl,cert={pki['default']}"
    cert = None
    if case == "tls-backend":
        backend = f"127.0.0.1:{tls_backends(procs, pki, a='backend')['a']},ssl,verify={pki['ca']}"
    else:
        backend = f"127.0.0.1:{procs.backends('a')[1]['a']}"
    extra = ["--relay", "uvloop" if case == "uvloop" else "epoll"]
    if case == "mtls":
        bind += f",ca={pki['client_ca']},verify=required"
        cert = pki["alice"]
    lb = procs.fastlb("--mode", "tcp", "--bind", bind, "--backend", backend, *extra)
    with tls_connect(port, client_context(pki, cert=cert), "default.test") as sock:
        assert echo_roundtrip(sock) == "a"
    assert not any(NATIVE in line for line in lb.lines[:])


def test_sni_alpn_and_protocol_floor(procs, pki):
    _, ports = procs.backends("a")
    port = free_port()
    lb = procs.fastlb("--mode", "tcp", "--relay", "epoll", "--bind",
                      f"127.0.0.1:{port},ssl,cert={pki['default']},cert={pki['api']},"
                      f"cert={pki['dir']}/wild.crt,key={pki['dir']}/wild.key",
                      "--backend", f"127.0.0.1:{ports['a']}")
    lb.wait_for_line(NATIVE)
    # Names are matched as tls.py does: case-insensitive, without a trailing dot, `*.parent`, else the first.
    for server_name, expected in [("api.test", "api.test"), ("API.Test", "api.test"), ("x.wild.test", "wild.test"),
                                  ("X.WILD.TEST", "wild.test"), ("a.b.wild.test", "default.test"),
                                  ("wild.test", "default.test"), ("unknown.test", "default.test"),
                                  (None, "default.test")]:
        context = client_context(pki, alpn=["h2", "http/1.1"])
        context.check_hostname = False
        with tls_connect(port, context, server_name) as sock:
            assert subject_cn(sock) == expected, server_name
            assert sock.selected_alpn_protocol() == "http/1.1"
            assert echo_roundtrip(sock) == "a"
    result = s_client(port, "-servername", "api.test.", "-CAfile", pki["ca"])
    assert result.returncode == 0 and "CN = api.test" in result.stdout, result.stdout
    # No protocol in common: no ALPN in the answer, the connection goes on.
    with tls_connect(port, client_context(pki, alpn=["h2"]), "default.test") as sock:
        assert sock.selected_alpn_protocol() is None
        assert echo_roundtrip(sock) == "a"
    # TLS 1.2 and 1.3 only; in TLS 1.2 ECDHE + AEAD only, in the server's order.
    for old in ("-tls1", "-tls1_1"):
        result = s_client(port, old, "-cipher", "DEFAULT:@SECLEVEL=0")
        assert result.returncode != 0, result.stdout
    for weak in ("AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-SHA"):
        assert s_client(port, "-tls1_2", "-cipher", weak + ":@SECLEVEL=0").returncode != 0, weak
    result = s_client(port, "-tls1_2", "-CAfile", pki["ca"], "-cipher",
                      "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256")
    assert result.returncode == 0 and "ECDHE-ECDSA-AES128-GCM-SHA256" in result.stdout, result.stdout
    assert "Compression: NONE" in result.stdout
    # A client-initiated renegotiation (TLS 1.2) is refused.
    proc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2",
                           "-CAfile", pki["ca"]], input="R\n", capture_output=True, text=True, timeout=10)
    assert "RENEGOTIATING" in proc.stderr + proc.stdout
    assert "no renegotiation" in proc.stderr + proc.stdout or proc.returncode != 0 \
        or "alert" in proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_sessions_resume_on_any_worker(procs, pki, version):
    _, ports = procs.backends("a")
    lb, port = native_lb(procs, pki, backend_port=ports["a"], extra=("--workers", "2"))
    wait_until(lambda: sum(NATIVE in line for line in lb.lines[:]) == 2, what="both workers")
    context = client_context(pki, maximum=version)
    context.minimum_version = version
    with tls_connect(port, context, "default.test") as sock:
        echo_roundtrip(sock)              # TLS 1.3: the tickets come after the handshake; read past them
        session = sock.session
    # SO_REUSEPORT spreads new connections over both workers: they share the ticket keys (the contexts
    # are made before the fork), so every one resumes.
    for _ in range(12):
        with tls_connect(port, context, "default.test", session=session) as sock:
            assert sock.session_reused
            assert sock.version() == ("TLSv1.3" if version == ssl.TLSVersion.TLSv1_3 else "TLSv1.2")
            assert echo_roundtrip(sock) == "a"
            if version == ssl.TLSVersion.TLSv1_3:
                session = sock.session


def test_a_failed_or_unfinished_handshake_costs_no_backend_connection(procs, pki):
    backend = socket.create_server(("127.0.0.1", 0))
    backend.settimeout(5)
    try:
        lb, port = native_lb(procs, pki, backend_port=backend.getsockname()[1],
                             extra=("--connect-timeout", "500ms"))
        lb.wait_for_line(NATIVE)
        # Not TLS at all, and a TLS client that does not trust the certificate: closed in the handshake.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
            plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
            wait_until(lambda: _closed(plain), what="the plaintext client closed")
        untrusting = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)      # no CA: verification fails
        with pytest.raises(ssl.SSLError):
            tls_connect(port, untrusting, "default.test").close()
        # A client that never finishes its handshake is closed after the handshake timeout.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
            wait_until(lambda: _closed(silent), what="the silent client closed")
        # The first connection the backend sees is the good client's.
        with tls_connect(port, client_context(pki), "default.test") as sock:
            sock.sendall(b"first\n")
            conn, _ = backend.accept()
            with conn:
                conn.settimeout(5)
                assert read_line(conn) == b"first\n"
                backend.setblocking(False)
                with pytest.raises(BlockingIOError):
                    backend.accept()
    finally:
        backend.close()


def _closed(sock) -> bool:
    """True once the peer closed the connection (EOF or reset); waits at most the socket's timeout."""
    try:
        return sock.recv(4096) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_bulk_both_ways_with_backpressure(procs, pki):
    _, ports = procs.backends("a")
    lb, port = native_lb(procs, pki, backend_port=ports["a"])
    lb.wait_for_line(NATIVE)
    payload = bytes(range(256)) * (16 * 1024)          # 4 MiB, echoed back while still being sent

    async def exchange():
        # One thread (asyncio's TLS): an ssl.SSLSocket must not read and write from two threads at once.
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(pki),
                                                       server_hostname="default.test")
        assert await reader.readline() == b"a\n"

        async def send():
            writer.write(payload)
            await writer.drain()

        sending = asyncio.ensure_future(send())
        received = await reader.readexactly(len(payload))
        await sending
        writer.close()
        return received

    assert asyncio.run(asyncio.wait_for(exchange(), 30)) == payload


def test_the_backends_end_closes_the_tls_client_cleanly(procs, pki):
    """TLS has no half-close: the backend's end reaches the client as close_notify (a clean EOF)."""
    backend = socket.create_server(("127.0.0.1", 0))
    backend.settimeout(5)
    try:
        lb, port = native_lb(procs, pki, backend_port=backend.getsockname()[1])
        lb.wait_for_line(NATIVE)
        with tls_connect(port, client_context(pki), "default.test") as sock:
            sock.sendall(b"hello\n")
            conn, _ = backend.accept()
            with conn:
                conn.settimeout(5)
                assert read_line(conn) == b"hello\n"
                conn.sendall(b"bye\n")
            assert read_line(sock) == b"bye\n"
            assert sock.recv(100) == b""          # close_notify: ssl raises SSLEOFError without one
    finally:
        backend.close()


def test_proxy_header_to_the_backend_names_the_tls_client(procs, pki):
    backend = socket.create_server(("127.0.0.1", 0))
    backend.settimeout(5)
    try:
        port = free_port()
        lb = procs.fastlb("--mode", "tcp", "--relay", "epoll", "--bind", f"127.0.0.1:{port},ssl,cert={pki['default']}",
                          "--backend", f"127.0.0.1:{backend.getsockname()[1]},send-proxy")
        lb.wait_for_line(NATIVE)
        with tls_connect(port, client_context(pki), "default.test") as sock:
            sock.sendall(b"hello\n")
            conn, _ = backend.accept()
            with conn:
                conn.settimeout(5)
                client_port = sock.getsockname()[1]
                assert read_line(conn) == f"PROXY TCP4 127.0.0.1 127.0.0.1 {client_port} {port}\r\n".encode()
                assert read_line(conn) == b"hello\n"
    finally:
        backend.close()


def test_sigterm_stops_accepting_and_drains_live_tls_connections(procs, pki):
    _, ports = procs.backends("a")
    lb, port = native_lb(procs, pki, backend_port=ports["a"], extra=("--grace-period", "20s"))
    lb.wait_for_line(NATIVE)
    with tls_connect(port, client_context(pki), "default.test") as live:
        assert read_line(live) == b"a\n"
        lb.signal(signal.SIGTERM)
        lb.wait_for_line(r"draining 1 connection")
        wait_until(lambda: not port_open(port), what="the listener to close")
        live.sendall(b"still here\n")                # the live connection keeps working
        assert read_line(live) == b"still here\n"
        assert lb.popen.poll() is None
    assert lb.wait_exit() == 0                      # it exits as soon as the last connection ended
    assert "grace period over" not in lb.output


def test_grace_period_cuts_tls_connections_that_do_not_finish(procs, pki):
    _, ports = procs.backends("a")
    lb, port = native_lb(procs, pki, backend_port=ports["a"], extra=("--grace-period", "300ms"))
    lb.wait_for_line(NATIVE)
    with tls_connect(port, client_context(pki), "default.test") as live:
        assert read_line(live) == b"a\n"
        lb.signal(signal.SIGTERM)
        assert lb.wait_exit() == 0
        try:
            data = live.recv(64)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        assert data == b""                           # reset or EOF: the relay is gone
    lb.wait_for_line(r"grace period over: closing 1 connection")


# ---- the backend connect the thread makes (EpollRelay.connect_here) ---------------------------------

def tls_ping(port, pki) -> str:
    with tls_connect(port, client_context(pki), "default.test") as sock:
        return echo_roundtrip(sock)


def test_connect_errors_and_retries_are_counted_as_on_the_python_path(procs, pki, token_file):
    _, ports = procs.backends("a")
    dead_port, port, admin = free_port(), free_port(), free_port()
    a, dead = f"127.0.0.1:{ports['a']}", f"127.0.0.1:{dead_port}"
    lb = procs.fastlb("--mode", "tcp", "--relay", "epoll", "--bind", f"127.0.0.1:{port},ssl,cert={pki['default']}",
                      "--backend", a, "--backend", dead, "--outlier-failures", "0", "--admin", str(admin),
                      "--admin-token-file", token_file, wait_port=0)
    lb.wait_for_line(NATIVE)
    wait_until(lambda: port_open(admin), what="the admin bind")
    assert {tls_ping(port, pki) for _ in range(10)} == {"a"}    # every failed connect retried on a
    samples = retried_connects_counted(admin, a, dead, 10)
    assert metric(samples, "fastlb_backend_connect_seconds_count", pool="default", backend=a) == 10


def test_without_retries_a_failed_connect_refuses_the_client(procs, pki):
    dead_port = free_port()
    lb, port = native_lb(procs, pki, backend_port=dead_port, extra=("--retries", "0"))
    lb.wait_for_line(NATIVE)
    with tls_connect(port, client_context(pki), "default.test") as sock:
        assert refused(sock)
    lb.wait_for_line(r"closing client connection\(s\) from 127\.0\.0\.1: connect failed to 1 backend")


def test_a_connect_that_times_out_moves_to_the_next_backend(procs, pki):
    # A listener that never accepts, its queue full: the kernel drops further SYNs, connects hang.
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    fillers = []
    try:
        while True:
            filler = socket.socket()
            filler.settimeout(0.3)
            fillers.append(filler)
            try:
                filler.connect(stuck.getsockname())
            except (socket.timeout, BlockingIOError):
                break
            if len(fillers) > 20:
                pytest.skip("the kernel accepts past a full listen queue here")
        _, ports = procs.backends("a")
        port = free_port()
        lb = procs.fastlb("--mode", "tcp", "--relay", "epoll", "--bind",
                          f"127.0.0.1:{port},ssl,cert={pki['default']}", "--backend",
                          f"127.0.0.1:{stuck.getsockname()[1]}", "--backend", f"127.0.0.1:{ports['a']}",
                          "--connect-timeout", "300ms", "--outlier-failures", "0", "--log-level", "debug")
        lb.wait_for_line(NATIVE)
        started = time.monotonic()
        assert {tls_ping(port, pki) for _ in range(4)} == {"a"}
        lb.wait_for_line(r"connect to 127\.0\.0\.1:\d+ failed \(\[Errno 110\]")
        assert time.monotonic() - started < 5
    finally:
        for filler in fillers:
            filler.close()
        stuck.close()


def test_backends_by_host_name_and_source_persistence_take_the_python_path(procs, pki):
    _, ports = procs.backends("a")
    for extra in (("--backend", f"localhost:{ports['a']}"),
                  ("--backend", f"127.0.0.1:{ports['a']}", "--sticky", "source")):
        port = free_port()
        lb = procs.fastlb("--mode", "tcp", "--relay", "epoll", "--bind",
                          f"127.0.0.1:{port},ssl,cert={pki['default']}", *extra)
        lb.wait_for_line(NATIVE)
        assert {tls_ping(port, pki) for _ in range(3)} == {"a"}


def ocsp_response(pki, name: str, status: str) -> str:
    """A DER OCSP response for pki[name] signed by the test CA (good or revoked); its path."""
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509 import ocsp
    ca = pki["ca_obj"]
    cert = x509.load_pem_x509_certificate((pki["dir"] / f"{name}.crt").read_bytes())
    now = datetime.datetime.now(datetime.timezone.utc)
    revoked = status == "revoked"
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=cert, issuer=ca.cert, algorithm=hashes.SHA1(),
        cert_status=ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD,
        this_update=now - datetime.timedelta(minutes=5), next_update=now + datetime.timedelta(days=1),
        revocation_time=now - datetime.timedelta(minutes=1) if revoked else None,
        revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, ca.cert)
    path = pki["dir"] / f"{name}-{status}.ocsp"
    path.write_bytes(builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    return str(path)


def status_of(port: int, server_name: str) -> str:
    """What `openssl s_client -status` says of the stapled response."""
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", server_name,
                          "-status"], input="", capture_output=True, text=True, timeout=10).stdout
    if "OCSP response: no response sent" in out:
        return "none"
    assert "OCSP Response Status: successful" in out, out
    return out.split("Cert Status: ", 1)[1].split()[0]


def test_ocsp_staple_per_certificate_and_reloaded(procs, pki, tmp_path):
    _, ports = procs.backends("a")
    staple = tmp_path / "default.ocsp"
    staple.write_bytes(open(ocsp_response(pki, "default", "good"), "rb").read())
    lb, port = native_lb(procs, pki, f"ocsp={staple}", f"cert={pki['api']}", backend_port=ports["a"])
    lb.wait_for_line(NATIVE)
    assert status_of(port, "default.test") == "good"
    assert status_of(port, "api.test") == "none"              # no staple file for that certificate
    # A refreshed response (here: revoked) is read again on reload, like the certificates.
    staple.write_bytes(open(ocsp_response(pki, "default", "revoked"), "rb").read())
    lb.signal(signal.SIGHUP)
    wait_until(lambda: status_of(port, "default.test") == "revoked", what="the reloaded staple")


@pytest.mark.parametrize("mode", ["http", "tcp-uvloop"])
def test_ocsp_staple_where_python_terminates_tls_is_refused_at_start(pki, mode):
    port = free_port()
    args = ["--bind", f"127.0.0.1:{port},ssl,cert={pki['default']},ocsp={pki['default']}", "--backend",
            "127.0.0.1:9"]
    args += ["--mode", "http"] if mode == "http" else ["--mode", "tcp", "--relay", "uvloop"]
    result = subprocess.run([sys.executable, "-m", "fastlb", *args], capture_output=True, text=True, timeout=30,
                            cwd=str(REPO), env=subprocess_env())
    assert result.returncode != 0
    assert "ocsp= staples on TLS binds the relay terminates" in result.stderr + result.stdout


def test_a_staple_file_that_is_no_ocsp_response_is_refused_at_start(pki):
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "fastlb", "--mode", "tcp", "--bind",
                             f"127.0.0.1:{port},ssl,cert={pki['default']},ocsp={pki['default']}", "--backend",
                             "127.0.0.1:9"], capture_output=True, text=True, timeout=30, cwd=str(REPO),
                            env=subprocess_env())
    assert result.returncode != 0
    assert f"ocsp={pki['default']}: not a DER OCSP response" in result.stderr + result.stdout
