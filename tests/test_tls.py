"""TLS end to end: real fastlb processes, real TLS clients (Python ssl, curl, openssl s_client), a test PKI
made here (tests/pki.py). Terminating binds (SNI, ALPN, protocol and cipher floor, mTLS), TLS backends
(verification, failover), SNI passthrough routing, certificate reload, shared session tickets; in HTTP
mode: X-Forwarded-Proto, the client subject header, HSTS, the redirect bind, 502 on backend verification."""
import asyncio
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time

import pytest

from fastlb import tls
from fastlb.config import ConfigError
from fastlb.cli import config_from_args
from fastlb.sni import client_hello_sni
from http_client import Client, build, requests_seen
from pki import CA
from procs import free_port, read_line, wait_until


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CA(directory, "test-ca")
    client_ca = CA(directory, "client-ca")
    rogue_ca = CA(directory, "rogue-ca")
    return {
        "dir": directory,
        "ca": str(ca.path),
        "ca_obj": ca,
        "client_ca": str(client_ca.path),
        "default": str(ca.issue("default", "default.test", ("default.test",))),
        "api": str(ca.issue("api", "api.test", ("api.test",))),
        "wild": str(ca.issue("wild", "wild.test", ("*.wild.test",))),
        "backend": str(ca.issue("backend", "backend.test", ("backend.test", "api.test", "*.wild.test",
                                                            "default.test"))),
        "rogue_backend": str(rogue_ca.issue("rogue-backend", "backend.test", ("backend.test",))),
        "alice": str(client_ca.issue("alice", "alice", client=True, organization="Payments, Inc")),
        "mallory": str(rogue_ca.issue("mallory", "mallory", client=True)),
    }


def client_context(pki, cert=None, alpn=None, maximum=None):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki["ca"])
    if cert:
        context.load_cert_chain(cert)
    if alpn:
        context.set_alpn_protocols(alpn)
    if maximum:
        context.maximum_version = maximum
    return context


def tls_connect(port, context, server_name=None, session=None):
    """A TLS connection to 127.0.0.1:port; without server_name no SNI is sent (and no name checked)."""
    if server_name is None:
        context.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        return context.wrap_socket(raw, server_hostname=server_name, session=session)
    except BaseException:
        raw.close()
        raise


def subject_cn(sock):
    return dict(rdn[0] for rdn in sock.getpeercert()["subject"])["commonName"]


def tls_backends(procs, pki, cert_key="backend", **names_to_cert):
    """Echo backends speaking TLS: returns name -> port."""
    ports = {name: free_port() for name in names_to_cert}
    proc = procs.start([sys.executable, "tests/backend_server.py",
                        *(f"{n}:{p}@{pki[names_to_cert[n]]}" for n, p in ports.items())], "tls-backends")
    proc.wait_for_line(r"^ready$")
    return ports


def echo_roundtrip(sock):
    """Reads the backend's name line, checks the echo; returns the name."""
    name = read_line(sock).decode().strip()
    sock.sendall(b"ping\n")
    assert read_line(sock) == b"ping\n"
    return name


def refused(sock) -> bool:
    """True when the server ended a just-made TLS connection without relaying anything."""
    try:
        return read_line(sock) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


# ---- terminating binds ----------------------------------------------------------------------------

def test_sni_selects_the_certificate_and_alpn_is_http11(procs, pki):
    _, ports = procs.backends("a")
    port = free_port()
    procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port},ssl,cert={pki['default']},cert={pki['api']},"
                 f"cert={pki['dir']}/wild.crt,key={pki['dir']}/wild.key",
                 "--backend", f"127.0.0.1:{ports['a']}")
    for server_name, expected in [("api.test", "api.test"), ("default.test", "default.test"),
                                  ("x.wild.test", "wild.test"), ("unknown.test", "default.test"),
                                  (None, "default.test")]:
        context = client_context(pki, alpn=["h2", "http/1.1"])
        if server_name == "unknown.test":
            context.check_hostname = False
        with tls_connect(port, context, server_name) as sock:
            assert subject_cn(sock) == expected, server_name
            assert sock.selected_alpn_protocol() == "http/1.1"
            assert sock.version() in ("TLSv1.2", "TLSv1.3")
            assert echo_roundtrip(sock) == "a"


def test_curl_gets_https_through_to_a_plain_http_backend(procs, pki, tmp_path):
    (tmp_path / "index.html").write_text("hello over tls\n")
    backend_port = free_port()
    backend = procs.start([sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                           "--directory", str(tmp_path), str(backend_port)], "http.server")
    wait_until(lambda: _port_open(backend_port), what="http.server")
    port = free_port()
    procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port},ssl,cert={pki['default']},cert={pki['api']}",
                 "--backend", f"127.0.0.1:{backend_port}")
    result = subprocess.run(["curl", "-sS", "-v", "--cacert", pki["ca"], "--resolve",
                             f"api.test:{port}:127.0.0.1", f"https://api.test:{port}/index.html"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello over tls\n"
    assert "CN=api.test" in result.stderr
    assert "ALPN: server accepted http/1.1" in result.stderr or "ALPN, server accepted to use http/1.1" in result.stderr
    assert backend.popen.poll() is None
    # HTTP/1.0: the backend ends the response by closing; TLS has no half-close, so the client connection
    # must be closed (close_notify) rather than left waiting.
    with tls_connect(port, client_context(pki), "api.test") as sock:
        sock.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):      # a socket timeout fails the test if the end never comes
            response += chunk
    assert response.startswith(b"HTTP/1.0 200") and response.endswith(b"hello over tls\n")


def _port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def s_client(port, *options, timeout=10):
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername",
                           "default.test", *options], input="", capture_output=True, text=True,
                          timeout=timeout)


def test_protocol_and_cipher_floor(procs, pki):
    _, ports = procs.backends("a")
    port = free_port()
    procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port},ssl,cert={pki['default']}", "--backend",
                 f"127.0.0.1:{ports['a']}")
    # SECLEVEL=0 makes the client willing to offer the old protocol: what is refused, the server refuses.
    for old in ("-tls1", "-tls1_1"):
        result = s_client(port, old, "-cipher", "DEFAULT:@SECLEVEL=0")
        assert result.returncode != 0, result.stdout
        assert "Cipher is (NONE)" in result.stdout or "no protocols available" in result.stderr \
            or "alert protocol version" in result.stderr, result.stdout + result.stderr
    # No RSA key exchange, no CBC in TLS 1.2: a client offering only those gets no cipher.
    for weak in ("AES128-GCM-SHA256", "ECDHE-RSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA256", "AES256-SHA"):
        result = s_client(port, "-tls1_2", "-cipher", weak + ":@SECLEVEL=0")
        assert result.returncode != 0, weak
    # The floor is the floor, not a wall: TLS 1.2 with ECDHE + AEAD, and TLS 1.3, do work.
    result = s_client(port, "-tls1_2", "-CAfile", pki["ca"])
    assert result.returncode == 0 and "TLSv1.2" in result.stdout, result.stdout
    assert "ECDHE-ECDSA-AES" in result.stdout or "ECDHE-ECDSA-CHACHA20" in result.stdout
    assert "Compression: NONE" in result.stdout
    result = s_client(port, "-tls1_3", "-CAfile", pki["ca"])
    assert result.returncode == 0 and "TLSv1.3" in result.stdout, result.stdout
    # A Python client capped at TLS 1.1 cannot connect either.
    with pytest.warns(DeprecationWarning):
        context = client_context(pki, maximum=ssl.TLSVersion.TLSv1_1)
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        tls_connect(port, context, "default.test").close()


def test_server_cipher_preference_and_no_renegotiation(procs, pki):
    _, ports = procs.backends("a")
    port = free_port()
    procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port},ssl,cert={pki['default']}", "--backend",
                 f"127.0.0.1:{ports['a']}")
    # The client prefers ChaCha20; the server's order (AES-GCM first) wins.
    result = s_client(port, "-tls1_2", "-CAfile", pki["ca"], "-cipher",
                      "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256")
    assert result.returncode == 0
    assert "ECDHE-ECDSA-AES128-GCM-SHA256" in result.stdout
    assert "Secure Renegotiation IS NOT supported" not in result.stdout or "TLSv1.3" in result.stdout
    # A client-initiated renegotiation (TLS 1.2, 'R' command) is refused.
    proc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2",
                           "-CAfile", pki["ca"]], input="R\n", capture_output=True, text=True, timeout=10)
    assert "RENEGOTIATING" in proc.stderr + proc.stdout
    assert "no renegotiation" in proc.stderr + proc.stdout or proc.returncode != 0 \
        or "alert" in proc.stderr, proc.stdout + proc.stderr


# ---- mTLS -----------------------------------------------------------------------------------------

def test_mtls_required(procs, pki):
    _, ports = procs.backends("a")
    port = free_port()
    procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port},ssl,cert={pki['default']},ca={pki['client_ca']},"
                 f"verify=required", "--backend", f"127.0.0.1:{ports['a']}")
    with tls_connect(port, client_context(pki, cert=pki["alice"]), "default.test") as sock:
        assert echo_roundtrip(sock) == "a"
    for cert in (None, pki["mallory"]):
        try:
            sock = tls_connect(port, client_context(pki, cert=cert), "default.test")
        except (ssl.SSLError, ConnectionResetError):
            continue                      # TLS 1.2: refused within the handshake
        with sock:                        # TLS 1.3: the refusal arrives after the client's Finished
            assert refused(sock), cert


def test_mtls_optional(procs, pki):
    _, ports = procs.backends("a")
    port = free_port()
    procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port},ssl,cert={pki['default']},ca={pki['client_ca']},"
                 f"verify=optional", "--backend", f"127.0.0.1:{ports['a']}")
    for cert in (None, pki["alice"]):
        with tls_connect(port, client_context(pki, cert=cert), "default.test") as sock:
            assert echo_roundtrip(sock) == "a"
    try:
        sock = tls_connect(port, client_context(pki, cert=pki["mallory"]), "default.test")
    except (ssl.SSLError, ConnectionResetError):
        return
    with sock:
        assert refused(sock)             # a certificate is optional; a bad one is still refused


def test_connection_tls_info_gives_the_http_mode_the_client_subject(pki):
    """The hook the HTTP mode uses (X-Forwarded-Proto, the client subject header), on a real socket."""
    server_tls = tls.ServerTLS("127.0.0.1:0", [tls.CertificateSpec(pki["default"]),
                                               tls.CertificateSpec(pki["api"])],
                               ca=pki["client_ca"], verify="optional")
    seen = []

    class Capture(asyncio.Protocol):
        def connection_made(self, transport):
            seen.append(tls.connection_tls_info(transport))
            transport.write(b"ok\n")

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Capture, "127.0.0.1", 0, ssl=server_tls.front)
        port = server.sockets[0].getsockname()[1]
        for cert in (pki["alice"], None):
            context = client_context(pki, cert=cert, alpn=["http/1.1"])
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context,
                                                           server_hostname="api.test")
            assert await reader.readline() == b"ok\n"
            writer.close()
        server.close()

    asyncio.run(main())
    with_cert, without = seen
    assert with_cert.client_subject == r"CN=alice,O=Payments\, Inc"
    assert with_cert.server_name == "api.test" and with_cert.alpn == "http/1.1"
    assert with_cert.version in ("TLSv1.2", "TLSv1.3")
    assert without.client_subject is None
    assert tls.CLIENT_SUBJECT_HEADER == "X-Client-Subject"


# ---- TLS backends ---------------------------------------------------------------------------------

def test_backend_verification_failure_moves_to_the_next_backend(procs, pki):
    ports = tls_backends(procs, pki, rogue="rogue_backend", good="backend")
    port = free_port()
    lb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}",
                      "--backend", f"127.0.0.1:{ports['rogue']},ssl,verify={pki['ca']},sni=backend.test",
                      "--backend", f"127.0.0.1:{ports['good']},ssl,verify={pki['ca']},sni=backend.test",
                      "--outlier-failures", "0")
    for _ in range(6):                   # round robin: every other pick is the rogue one
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert echo_roundtrip(sock) == "good"
    lb.wait_for_line(r"TLS handshake with backend 127\.0\.0\.1:\d+ failed: .*certificate")


def test_backend_verification_is_on_by_default_and_off_only_when_asked(procs, pki):
    ports = tls_backends(procs, pki, rogue="rogue_backend")
    port = free_port()
    # No verify=: the system CA store, which does not know the test CAs: the connection is refused.
    lb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['rogue']},ssl")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert sock.recv(100) == b""
    lb.wait_for_line(r"TLS handshake with backend .* failed")
    lb.kill()
    port = free_port()
    lb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{ports['rogue']},ssl,verify=none")
    lb.wait_for_line(r"verification is off \(verify=none\)")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        assert echo_roundtrip(sock) == "rogue"


def test_tls_in_and_out(procs, pki):
    """Terminate with one certificate, re-encrypt to the backend: the client sees fastlb's certificate."""
    ports = tls_backends(procs, pki, secure="backend")
    port = free_port()
    procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port},ssl,cert={pki['api']}",
                 "--backend", f"127.0.0.1:{ports['secure']},ssl,verify={pki['ca']}")
    with tls_connect(port, client_context(pki), "api.test") as sock:
        assert subject_cn(sock) == "api.test"
        assert echo_roundtrip(sock) == "secure"


# ---- SNI passthrough --------------------------------------------------------------------------------

def test_sni_passthrough_routes_by_server_name(procs, pki):
    ports = tls_backends(procs, pki, main="backend", api="backend", wild="backend")
    port = free_port()
    procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port},sni-route",
                 "--sni-route", "api.test=api", "--sni-route", "*.wild.test=wild",
                 "--backend", f"127.0.0.1:{ports['main']}",
                 "--backend", f"127.0.0.1:{ports['api']},group=api",
                 "--backend", f"127.0.0.1:{ports['wild']},group=wild")
    for server_name, expected in [("api.test", "api"), ("a.wild.test", "wild"), ("default.test", "main"),
                                  ("API.TEST", "api"), (None, "main")]:
        # The client verifies the *backend's* certificate: TLS went through untouched.
        with tls_connect(port, client_context(pki), server_name) as sock:
            assert subject_cn(sock) == "backend.test"
            assert echo_roundtrip(sock) == expected, server_name
    # Not TLS at all: closed without reaching a backend.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        assert sock.recv(100) == b""


# ---- reload and expiry ------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_reload_swaps_the_certificate_and_keeps_live_connections(procs, pki, tmp_path, workers):
    site = tmp_path / "site.pem"
    shutil.copy(pki["default"], site)
    _, ports = procs.backends("a")
    port = free_port()
    lb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port},ssl,cert={site}", "--backend",
                      f"127.0.0.1:{ports['a']}", "--workers", str(workers))
    old = tls_connect(port, client_context(pki), "default.test")
    try:
        assert subject_cn(old) == "default.test" and echo_roundtrip(old) == "a"
        new_pem = pki["ca_obj"].issue("site-v2", "default-v2.test", ("default.test",), days=5)
        os.replace(new_pem, site)
        lb.signal(signal.SIGHUP)
        wait_until(lambda: sum("certificates reloaded" in line for line in lb.lines[:]) == workers,
                   what="every worker reloaded")
        lb.wait_for_line(r"site\.pem of 127\.0\.0\.1:\d+ expires in (4\.9|5\.0) days")
        # Every worker serves the new certificate to new clients ...
        seen = set()
        for _ in range(8):
            with tls_connect(port, client_context(pki), "default.test") as sock:
                seen.add(subject_cn(sock))
                assert echo_roundtrip(sock) == "a"
        assert seen == {"default-v2.test"}
        # ... while the client connected before the reload keeps its connection.
        old.sendall(b"still here\n")
        assert read_line(old) == b"still here\n"
        assert subject_cn(old) == "default.test"
    finally:
        old.close()


def test_a_broken_certificate_on_reload_keeps_the_current_one(procs, pki, tmp_path):
    site = tmp_path / "site.pem"
    shutil.copy(pki["default"], site)
    _, ports = procs.backends("a")
    port = free_port()
    lb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port},ssl,cert={site}", "--backend", f"127.0.0.1:{ports['a']}")
    site.write_text("not a certificate\n")
    lb.signal(signal.SIGHUP)
    lb.wait_for_line(r"certificate reload: .*site\.pem.*keeping the current certificates")
    with tls_connect(port, client_context(pki), "default.test") as sock:
        assert subject_cn(sock) == "default.test" and echo_roundtrip(sock) == "a"


def test_certificate_expiry_hook(pki):
    server_tls = tls.prepare_server_tls(config_from_args(
        ["--bind", f"127.0.0.1:1,ssl,cert={pki['default']},cert={pki['api']}", "--backend",
         "127.0.0.1:2"])[1].binds)
    now = time.time()
    expiry = tls.certificate_expiry(server_tls, now)
    assert [(bind, os.path.basename(path)) for bind, path, _ in expiry] == [
        ("127.0.0.1:1", "default.pem"), ("127.0.0.1:1", "api.pem")]
    assert all(89 < days <= 90 for _, _, days in expiry)
    assert tls.certificate_expiry(server_tls, now + 10 * 86400)[0][2] == pytest.approx(expiry[0][2] - 10)


# ---- resumption ---------------------------------------------------------------------------------------

def test_session_tickets_resume_on_any_worker(procs, pki):
    _, ports = procs.backends("a")
    port = free_port()
    lb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port},ssl,cert={pki['default']}", "--backend",
                      f"127.0.0.1:{ports['a']}", "--workers", "2")
    wait_until(lambda: len([l for l in lb.lines if "listening on" in l]) == 2, what="both workers")
    context = client_context(pki)
    context.maximum_version = ssl.TLSVersion.TLSv1_2      # the session is usable right after the handshake
    with tls_connect(port, context, "default.test") as sock:
        echo_roundtrip(sock)
        session = sock.session
    # Each new connection lands on either worker (SO_REUSEPORT hashes the source port): 12 resumptions
    # in a row would fail with probability 1 - 2^-12 if only the worker that issued the ticket knew its key.
    for _ in range(12):
        with tls_connect(port, context, "default.test", session=session) as sock:
            assert sock.session_reused
            echo_roundtrip(sock)


# ---- config -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bind, message", [
    ("127.0.0.1:1,ssl", "ssl needs a certificate"),
    ("127.0.0.1:1,cert={default}", "add the 'ssl' option"),
    ("127.0.0.1:1,ssl,cert={default},verify=optional", "needs the CA"),
    ("127.0.0.1:1,ssl,cert={default},sni-route", "excludes ssl"),
    ("127.0.0.1:1,ssl,cert=/nonexistent.pem", "does not exist"),
    ("127.0.0.1:1,ssl,key={default}", "must follow the cert="),
])
def test_bind_tls_option_errors(pki, capsys, bind, message):
    with pytest.raises(SystemExit):
        config_from_args(["--bind", bind.format(**pki), "--backend", "127.0.0.1:2"])
    assert message in capsys.readouterr().err


def test_ca_alone_means_client_certificates_are_required(pki):
    _, config = config_from_args(["--bind", f"127.0.0.1:1,ssl,cert={pki['default']},ca={pki['client_ca']}",
                                  "--backend", "127.0.0.1:2"])
    assert config.binds[0].verify == "required"


def test_toml_tls_settings_and_errors(pki, tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text(f'''
mode = "tcp"

[[bind]]
address = "127.0.0.1:8443"
ssl = true
cert = ["{pki['dir']}/default.crt", "{pki['dir']}/api.crt"]
key = ["{pki['dir']}/default.key", "{pki['dir']}/api.key"]
ca = "{pki['client_ca']}"
verify = "optional"

[[bind]]
address = "127.0.0.1:9443"
sni_route = true

[sni_routes]
"api.test" = "api"

[[backend]]
address = "127.0.0.1:80"

[[backend]]
address = "127.0.0.1:443"
ssl = true
verify = "{pki['ca']}"
sni = "backend.test"
group = "api"
''')
    _, config = config_from_args(["--config", str(path)])
    bind = config.binds[0]
    assert bind.ssl and [c.key.endswith(".key") for c in bind.certificates] == [True, True]
    assert bind.verify == "optional" and config.binds[1].sni_route
    assert config.sni_routes == {"api.test": "api"}
    assert config.backends[1].ssl and config.backends[1].sni == "backend.test"
    path.write_text(path.read_text().replace('"api.test" = "api"', '"api.test" = "nope"'))
    with pytest.raises(ConfigError, match="backend group 'api' is named by no SNI route"):
        config_from_args(["--config", str(path)])
    path.write_text(path.read_text().replace('verify = "optional"', 'verify = "sometimes"'))
    with pytest.raises(ConfigError, match=r"lb\.toml:10: bind\[1\]\.verify"):
        config_from_args(["--config", str(path)])


# ---- the ClientHello parser on real ClientHellos --------------------------------------------------

def test_client_hello_sni_on_openssl_client_hellos():
    def hello(name):
        context = ssl.create_default_context()
        if name is None:
            context.check_hostname = False
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = context.wrap_bio(incoming, outgoing, server_hostname=name)
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        return outgoing.read()

    data = hello("Shop.Example.com")
    assert client_hello_sni(data) == "shop.example.com"
    assert client_hello_sni(hello(None)) is None
    # Split across two records, delivered in pieces.
    body = data[5:]
    split = bytes([22, 3, 1]) + (100).to_bytes(2) + body[:100] + bytes([22, 3, 1]) + \
        (len(body) - 100).to_bytes(2) + body[100:]
    from fastlb.sni import NEED_MORE
    assert client_hello_sni(split[:150]) is NEED_MORE
    assert client_hello_sni(split) == "shop.example.com"


# ---- HTTP mode on TLS binds -------------------------------------------------------------------------

class HTTPSClient(Client):
    """tests/http_client.Client over a TLS connection (Python ssl, verifying fastlb's certificate)."""

    def __init__(self, port, context, server_name="default.test", timeout=5.0):
        self.sock = tls_connect(port, context, server_name)
        self.sock.settimeout(timeout)
        self.leftover = b""
        self.timeout = timeout


def seen_headers(backend, start, count):
    """The lower-cased headers of the last `count` requests the HTTP backend logged after line start."""
    seen = requests_seen(backend, start, at_least=count)
    assert len(seen) == count, seen
    return [[(k.lower(), v) for k, v in request["headers"]] for request in seen]


def test_http_tls_bind_sets_forwarded_proto_and_the_client_subject(procs, pki):
    backend, ports = procs.http_backends("a")
    tls_port, plain_port = free_port(), free_port()
    procs.fastlb("--bind", f"127.0.0.1:{tls_port},ssl,cert={pki['default']},ca={pki['client_ca']},"
                 f"verify=optional", "--bind", f"127.0.0.1:{plain_port}",
                 "--backend", f"127.0.0.1:{ports['a']}")
    forged = {"X-Client-Subject": "CN=root", "x-client-subject": "CN=admin", "X-Client-Verified": "SUCCESS",
              "X-Forwarded-Proto": "http"}
    start = len(backend.lines)
    # mTLS with a certificate: fastlb's subject, once per request, on every request of the connection.
    with HTTPSClient(tls_port, client_context(pki, cert=pki["alice"])) as client:
        for _ in range(2):
            response = client.request("GET", "/who", headers=forged)
            assert response.status == 200 and response.body == b"a GET /who\n"
    # No client certificate (verify=optional): no subject; the forged ones are still removed.
    with HTTPSClient(tls_port, client_context(pki)) as client:
        assert client.request("GET", "/anon", headers=forged).status == 200
    # A plain bind: X-Forwarded-Proto http, forged subject removed.
    with Client(plain_port) as client:
        assert client.request("GET", "/plain", headers=forged).status == 200
    alice1, alice2, anonymous, plain = seen_headers(backend, start, 4)
    for headers in (alice1, alice2):
        assert [v for k, v in headers if k == "x-client-subject"] == [r"CN=alice,O=Payments\, Inc"]
        assert [v for k, v in headers if k == "x-forwarded-proto"] == ["https"]
    for headers, proto in ((anonymous, "https"), (plain, "http")):
        assert [v for k, v in headers if k == "x-client-subject"] == []
        assert [v for k, v in headers if k == "x-forwarded-proto"] == [proto]
    for headers in (alice1, alice2, anonymous, plain):
        assert "x-client-verified" not in dict(headers)


def test_http_hsts_on_tls_binds_only_and_per_pool(procs, pki, tmp_path):
    backend, ports = procs.http_backends("a", "b")
    tls_port, plain_port = free_port(), free_port()
    path = tmp_path / "lb.toml"
    path.write_text(f'''
hsts = "365d"

[[bind]]
address = "127.0.0.1:{tls_port}"
ssl = true
cert = "{pki['default']}"

[[bind]]
address = "127.0.0.1:{plain_port}"

[[backend]]
address = "127.0.0.1:{ports['a']}"

[[pool]]
name = "api"
backend = ["127.0.0.1:{ports['b']}"]
hsts = 600

[[pool]]
name = "legacy"
backend = ["127.0.0.1:{ports['b']}"]
hsts = 0

[[route]]
pool = "api"
path_prefix = "/api/"

[[route]]
pool = "legacy"
path_prefix = "/legacy/"
''')
    procs.fastlb("--config", str(path), wait_port=tls_port)
    with HTTPSClient(tls_port, client_context(pki)) as client:
        response = client.request("GET", "/")
        assert response.header_all("Strict-Transport-Security") == ["max-age=31536000"]
        assert client.request("GET", "/api/x").header_all("Strict-Transport-Security") == ["max-age=600"]
        assert client.request("GET", "/legacy/x").header_all("Strict-Transport-Security") == []
        # fastlb's header replaces the backend's own where the pool sets HSTS ...
        assert client.request("GET", "/hsts").header_all("Strict-Transport-Security") == ["max-age=31536000"]
        # ... and the backend's passes unchanged where it does not.
        assert client.request("GET", "/legacy/hsts").header_all("Strict-Transport-Security") == []
    with Client(plain_port) as client:
        assert client.request("GET", "/").header_all("Strict-Transport-Security") == []
        assert client.request("GET", "/api/x").header_all("Strict-Transport-Security") == []
        assert client.request("GET", "/hsts").header_all("Strict-Transport-Security") == ["max-age=1"]


def test_plain_bind_redirects_to_https(procs, pki):
    backend, ports = procs.http_backends("a")
    tls_port, redirect_port, default_port = free_port(), free_port(), free_port()
    procs.fastlb("--bind", f"127.0.0.1:{tls_port},ssl,cert={pki['default']}",
                 "--bind", f"127.0.0.1:{redirect_port},redirect-https={tls_port}",
                 "--bind", f"127.0.0.1:{default_port},redirect-https",
                 "--backend", f"127.0.0.1:{ports['a']}")
    wait_until(lambda: _port_open(redirect_port) and _port_open(default_port), what="redirect binds")
    start = len(backend.lines)
    with Client(redirect_port) as client:
        # GET and HEAD: 301; the Host's port is replaced by the HTTPS one; target kept with its query.
        client.send(build("GET", "/pay/1?x=y", host=f"default.test:{redirect_port}"))
        response = client.read_response()
        assert response.status == 301 and response.body == b""
        assert response.header("Location") == f"https://default.test:{tls_port}/pay/1?x=y"
        # Other methods: 308 (method and body kept by the client); the connection stays usable.
        response = client.request("POST", "/pay", body=b"amount=5")
        assert response.status == 308
        assert response.header("Location") == f"https://test:{tls_port}/pay"
        client.send(b"GET http://Shop.Example:8080/a/b HTTP/1.1\r\nHost: ignored\r\n\r\n")
        assert client.read_response().header("Location") == f"https://Shop.Example:{tls_port}/a/b"
        client.send(b"GET / HTTP/1.0\r\n\r\n")        # no Host to redirect to
        assert client.read_response().status == 400
    with Client(default_port) as client:
        response = client.request("GET", "/x")
        assert response.status == 301 and response.header("Location") == "https://test/x"
    # curl follows the redirect to the TLS bind, verifies fastlb's certificate and gets the backend's answer.
    result = subprocess.run(["curl", "-sS", "-L", "--cacert", pki["ca"], "-D", "-",
                             "--resolve", f"default.test:{redirect_port}:127.0.0.1",
                             "--resolve", f"default.test:{tls_port}:127.0.0.1",
                             f"http://default.test:{redirect_port}/followed"],
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert "HTTP/1.1 301" in result.stdout and result.stdout.endswith("a GET /followed\n")
    # Only the request curl made over HTTPS reached the backend, with X-Forwarded-Proto https.
    (seen,) = requests_seen(backend, start, at_least=1)
    assert seen["url"] == "/followed"
    assert dict((k.lower(), v) for k, v in seen["headers"])["x-forwarded-proto"] == "https"


def test_http_backend_verification_failure_gives_502(procs, pki):
    backend, ports = procs.http_backends("plain")
    tls_ports = {name: free_port() for name in ("rogue", "good")}
    tls_backend = procs.start([sys.executable, "tests/http_backend.py",
                               f"rogue:{tls_ports['rogue']}@{pki['rogue_backend']}",
                               f"good:{tls_ports['good']}@{pki['backend']}"], "https-backends")
    tls_backend.wait_for_line(r"^ready$")
    verify = f"ssl,verify={pki['ca']},sni=backend.test"
    # Round robin over a backend whose certificate does not verify and a good one: every request
    # is served by the good one (a failed handshake is a failed connect: the next candidate).
    port = free_port()
    lb = procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{tls_ports['rogue']},{verify}",
                      "--backend", f"127.0.0.1:{tls_ports['good']},{verify}", "--outlier-failures", "0")
    with Client(port) as client:
        for _ in range(4):
            response = client.request("GET", "/x")
            assert response.status == 200 and response.body == b"good GET /x\n"
    lb.wait_for_line(r"TLS handshake with backend 127\.0\.0\.1:\d+ failed: .*certificate")
    # Only the unverifiable backend: 502 Bad Gateway (not 503), and the request never reached it.
    port = free_port()
    procs.fastlb("--bind", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{tls_ports['rogue']},{verify}",
                 "--outlier-failures", "0")
    with Client(port) as client:
        response = client.request("GET", "/secret")
        assert response.status == 502
    assert not any(line.startswith("REQ rogue") for line in tls_backend.lines[:])


def test_http_mode_tls_config_errors(pki, capsys):
    for argv, message in [
        (["--bind", "127.0.0.1:1,redirect-https,ssl,cert=" + pki["default"]], "excludes ssl"),
        (["--mode", "tcp", "--bind", "127.0.0.1:1,redirect-https"], "needs mode 'http'"),
        (["--mode", "tcp", "--bind", "127.0.0.1:1", "--hsts", "60"], "needs mode 'http'"),
        (["--bind", "127.0.0.1:1,sni-route"], "need --mode tcp"),
        (["--bind", "127.0.0.1:1", "--hsts", "1.5"], "whole seconds"),
    ]:
        try:
            config_from_args([*argv, "--backend", "127.0.0.1:2"])
        except ConfigError as exc:
            assert message in str(exc), (argv, exc)
        except SystemExit:
            assert message in capsys.readouterr().err, argv
        else:
            raise AssertionError(f"accepted: {argv}")


# ---- TLS with the operations side (admin API, metrics, reload, health verdicts by address) -----------

def _admin_get(admin, path, token):
    import http.client
    import json
    connection = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def _expiry_metrics(admin):
    from prometheus_client.parser import text_string_to_metric_families
    status, text = _admin_get(admin, "/metrics", "")
    assert status == 200
    return {(s.labels["bind"], os.path.basename(s.labels["file"])): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "fastlb_certificate_expiry_days"}


@pytest.mark.parametrize("workers", [1, 2])
def test_certificate_expiry_in_metrics_and_api_and_ctl_reload_reloads_certificates(procs, pki, tmp_path,
                                                                                      workers):
    import json
    from procs import REPO, port_open, subprocess_env
    token = "tls-admin-token-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    site = tmp_path / "site.pem"
    shutil.copy(pki["default"], site)
    _, ports = procs.backends("a")
    port, admin = free_port(), free_port()
    lb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port},ssl,cert={site},cert={pki['api']}",
                      "--backend", f"127.0.0.1:{ports['a']}", "--workers", str(workers),
                      "--admin", str(admin), "--admin-token-file", str(token_file), wait_port=0)
    wait_until(lambda: lb.output.count("INFO listening on") == workers, what="workers listening")
    wait_until(lambda: port_open(admin), what="the admin bind")
    bind = f"127.0.0.1:{port}"
    expiry = _expiry_metrics(admin)
    assert set(expiry) == {(bind, "site.pem"), (bind, "api.pem")}
    assert all(89 < days <= 90 for days in expiry.values())
    status, body = _admin_get(admin, "/api/certificates", "wrong")
    assert status == 401
    status, body = _admin_get(admin, "/api/certificates", token)
    assert status == 200
    listed = json.loads(body)["certificates"]
    assert [(c["bind"], os.path.basename(c["file"])) for c in listed] == [(bind, "site.pem"), (bind, "api.pem")]

    # A new certificate in place, then `fastlb ctl reload`: no config file, yet the certificates reload
    # everywhere (answered once every worker has applied it), and the expiry follows.
    new_pem = pki["ca_obj"].issue("site-v3", "default-v3.test", ("default.test",), days=5)
    os.replace(new_pem, site)
    result = subprocess.run([sys.executable, "-m", "fastlb", "ctl", "--admin", f"127.0.0.1:{admin}",
                             "--token-file", str(token_file), "reload"],
                            capture_output=True, text=True, timeout=30, env=subprocess_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "TLS certificates: reloaded for 1 bind(s)" in result.stdout
    wait_until(lambda: sum("certificates reloaded" in line for line in lb.lines[:]) >= workers,
               what="every worker reloaded")
    seen = set()
    for _ in range(8):
        with tls_connect(port, client_context(pki), "default.test") as sock:
            seen.add(subject_cn(sock))
            assert echo_roundtrip(sock) == "a"
    assert seen == {"default-v3.test"}
    expiry = _expiry_metrics(admin)
    assert 4 < expiry[(bind, "site.pem")] <= 5 and 89 < expiry[(bind, "api.pem")] <= 90
    ctl = subprocess.run([sys.executable, "-m", "fastlb", "ctl", "--admin", f"127.0.0.1:{admin}",
                          "--token-file", str(token_file), "certificates"],
                         capture_output=True, text=True, timeout=30, env=subprocess_env(), cwd=REPO)
    assert ctl.returncode == 0 and "site.pem" in ctl.stdout and "api.pem" in ctl.stdout


def test_health_verdicts_reach_the_sni_group_pools_by_address(procs, pki, tmp_path):
    """The master's checks send verdicts by address over the channel: a backend of an SNI group that
    stops answering is down in that group's pool in every worker, and the group's other backend serves."""
    import json
    from procs import port_open
    token = "tls-admin-token-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    main_ports = tls_backends(procs, pki, main="backend", api1="backend")
    api2_ports = tls_backends(procs, pki, api2="backend")
    api2_proc = procs.started[-1]
    port, admin = free_port(), free_port()
    lb = procs.fastlb("--mode", "tcp", "--bind", f"127.0.0.1:{port},sni-route", "--sni-route", "api.test=api",
                      "--backend", f"127.0.0.1:{main_ports['main']}",
                      "--backend", f"127.0.0.1:{main_ports['api1']},group=api",
                      "--backend", f"127.0.0.1:{api2_ports['api2']},group=api",
                      "--check", "tcp", "--check-interval", "100ms", "--fall", "2",
                      "--workers", "2", "--admin", str(admin), "--admin-token-file", str(token_file),
                      wait_port=0)
    wait_until(lambda: lb.output.count("INFO listening on") == 2, what="workers listening")
    wait_until(lambda: port_open(admin), what="the admin bind")

    def view():
        status, body = _admin_get(admin, "/api/backends", token)
        assert status == 200
        data = json.loads(body)
        return data["workers"], {b["address"]: b for b in data["pools"][0]["backends"]}

    api2 = f"127.0.0.1:{api2_ports['api2']}"
    wait_until(lambda: view()[0] == 2, what="workers reporting")
    workers, backends = view()
    assert backends[api2]["group"] == "api" and backends[api2]["state"] == "up"
    assert backends[f"127.0.0.1:{main_ports['main']}"]["group"] == "default"
    api2_proc.kill()
    # Down in every worker (the state is each worker's own; one value means all agree).
    wait_until(lambda: view()[1][api2]["state"] == "down", what="the verdict in every worker")
    for _ in range(6):
        with tls_connect(port, client_context(pki), "api.test") as sock:
            assert echo_roundtrip(sock) == "api1"


def test_hsts_is_added_to_responses_the_fast_path_would_take(procs, pki):
    """The response fast path (and the C engine) forward a backend's header lines as they are; where
    fastlb adds HSTS (a TLS bind, a pool with hsts) they must add its line too (and drop the backend's
    own), or the header would be missing."""
    from fastlb.http.runtime import HttpSettings
    from fastlb.http.headers import scan_response
    backend, ports = procs.http_backends("a")
    tls_port, plain_port = free_port(), free_port()
    args = ["--bind", f"127.0.0.1:{tls_port},ssl,cert={pki['default']}", "--bind", f"127.0.0.1:{plain_port}",
            "--backend", f"127.0.0.1:{ports['a']}", "--hsts", "3600", "--workers", "2"]
    config = config_from_args(args)[1]
    # The configuration keeps the fast path on (it stays on for plain binds) ...
    assert scan_response is not None, "compiled _head module missing: build with setup.py build_ext"
    assert HttpSettings(config, frozenset()).fast_responses
    # ... and the backend's answer to "/" is one plain response the scanner takes whole.
    assert scan_response(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\na GET /x\n123") is not None
    procs.fastlb(*args, wait_port=tls_port)
    with HTTPSClient(tls_port, client_context(pki)) as client:
        for _ in range(4):                          # keep-alive: each response on a reused connection
            response = client.request("GET", "/x")
            assert response.status == 200 and response.body == b"a GET /x\n"
            assert response.header_all("Strict-Transport-Security") == ["max-age=3600"]
    with Client(plain_port) as client:
        response = client.request("GET", "/x")
        assert response.status == 200 and response.header_all("Strict-Transport-Security") == []
