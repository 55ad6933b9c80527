"""TLS: server contexts for `ssl` binds (SNI, mTLS, reload, expiry), client contexts for `ssl` backends,
and what a terminated connection tells the HTTP mode.

Safe by default: TLS 1.2 and 1.3 only; in TLS 1.2 only ECDHE key exchange with AEAD ciphers (no RSA key
exchange, no CBC, no SHA-1 MAC); no compression, no renegotiation, the server's cipher order. TLS 1.3
suites are OpenSSL's defaults, which are all AEAD. Backends are verified (system CA store unless a file is
given); turning that off takes an explicit `verify=none`.

How a bind serves several certificates and reloads them without dropping connections: the listening
socket is given one *front* context for its whole life. Its `sni_callback` runs on every ClientHello
(with server_name None when the client sent no SNI) and switches the handshake to the context of the
current *generation* that matches the name (exact name, then `*.parent` wildcard, then the default: the
first certificate). A reload builds a new generation and swaps it in atomically; handshakes already done
keep the context they were switched to, so live connections are untouched.

Session resumption: OpenSSL keeps the session cache and the ticket keys of the context a connection
*started* on (the front context), whatever context the SNI callback switched to. So resumption survives a
certificate reload, and because front contexts are made before the workers fork (`prepare_server_tls`),
every worker holds the same ticket keys: a client resumes on any worker. Python's ssl module has no way
to set ticket keys (no SSL_CTX_set_tlsext_ticket_keys), so they are random per process start and are not
rotated while fastlb runs; a restart rotates them.

The relay thread's and the HTTP engine's TLS: besides its Python contexts, a bind gets `ServerTLS.native`,
the same settings (client certificates included) built in C with OpenSSL (fastlb/_ctls.pxi): the relay
thread (tcp mode, `--relay epoll`, binds without client certificates) and the HTTP engine
(fastlb/http/_fast.pyx) accept, handshake and serve there, without the event loop. It is made here too, before
the fork (one set of ticket keys for every worker), and reloads with the Python contexts. None (the
event loop's TLS serves the bind) when the C module is not built or cannot load the files.

OCSP stapling (`ocsp=FILE` after a `cert=`) is done by the relay's own OpenSSL contexts only: Python's ssl
module exposes no server-side status callback (SSL_CTX_set_tlsext_status_cb), so binds it terminates
(HTTP mode, mTLS) refuse a staple file at start-up.
"""
from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# The certificate files of a bind are part of its configuration: the dataclass lives with the other specs
# (tls.py reads configuration; configuration does not import tls.py).
from fastlb.config.specs import CertificateSpec

if TYPE_CHECKING:
    from fastlb.config.specs import BackendSpec, BindSpec

log = logging.getLogger("fastlb")

# TLS 1.2 suites: ECDHE (forward secrecy) with AES-GCM or ChaCha20-Poly1305 (AEAD), ECDSA or RSA
# certificates. Mozilla's "intermediate" list without the DHE suites (slow, and a DH-parameter trap).
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])
ALPN_PROTOCOLS = ["http/1.1"]
# HTTP mode with HTTP/2 on (fastlb/http2/): h2 first, HTTP/1.1 for the clients that do not speak it.
ALPN_HTTP2 = ["h2", "http/1.1"]
VERIFY_MODES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}

# The header the HTTP mode sets from `TLSInfo.client_subject` (after removing any the client sent), and
# the one saying whether a verified client certificate was presented.
CLIENT_SUBJECT_HEADER = "X-Client-Subject"
CLIENT_VERIFIED_HEADER = "X-Client-Verified"


class TLSConfigError(Exception):
    """A certificate, key or CA file that cannot be loaded. str() names the file and the problem."""


# ---- server side ----------------------------------------------------------------------------------

def _hardened(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
                        | ssl.OP_SINGLE_ECDH_USE)
    return context


def server_context(certificate: CertificateSpec, ca: str | None = None, verify: str = "none",
                   alpn: list[str] = ALPN_PROTOCOLS) -> ssl.SSLContext:
    """One certificate's server context with the safe settings above; `ca` + `verify` ask for client
    certificates signed by that CA (`optional`: a client without one is let in, one with an invalid one
    is refused)."""
    context = _hardened(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.set_alpn_protocols(alpn)
    try:
        context.load_cert_chain(certificate.cert, certificate.key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load certificate {certificate.cert}"
                             f"{' with key ' + certificate.key if certificate.key else ''}: "
                             f"{_describe(exc)}") from None
    if ca:
        try:
            context.load_verify_locations(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot load CA file {ca}: {_describe(exc)}") from None
        context.verify_mode = VERIFY_MODES[verify]
    return context


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


@dataclass(frozen=True)
class CertificateInfo:
    """What fastlb reads from a certificate file: the names it serves and when it expires."""
    path: str
    names: tuple[str, ...]        # DNS names of subjectAltName (lower case), or the CN without SANs
    not_after: float              # Unix time

    def days_left(self, now: float | None = None) -> float:
        return (self.not_after - (time.time() if now is None else now)) / 86400.0


def read_certificate(path: str) -> CertificateInfo:
    """Names and expiry of the first certificate in a PEM file.

    `ssl._ssl._test_decode_cert` is CPython's own PEM decoder (what the stdlib tests use); it spares a
    runtime dependency on a crypto library for two fields."""
    try:
        decoded = ssl._ssl._test_decode_cert(path)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot read certificate {path}: {_describe(exc)}") from None
    names = [value.lower() for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        names = [value.lower() for rdn in decoded.get("subject", ()) for key, value in rdn
                 if key == "commonName"]
    return CertificateInfo(path, tuple(names), ssl.cert_time_to_seconds(decoded["notAfter"]))


class _Generation:
    """One load of a bind's certificates: contexts by server name, and the default."""

    __slots__ = ("default", "by_name", "infos", "loaded_at")

    def __init__(self, certificates: list[CertificateSpec], ca: str | None, verify: str,
                 alpn: list[str] = ALPN_PROTOCOLS) -> None:
        self.by_name: dict[str, ssl.SSLContext] = {}
        self.infos: list[CertificateInfo] = []
        self.default: ssl.SSLContext | None = None
        for certificate in certificates:
            context = server_context(certificate, ca, verify, alpn)
            info = read_certificate(certificate.cert)
            self.infos.append(info)
            if self.default is None:
                self.default = context
            for name in info.names:
                self.by_name.setdefault(name, context)    # the first certificate naming it wins
        self.loaded_at = time.time()

    def lookup(self, server_name: str | None) -> ssl.SSLContext:
        if server_name:
            name = server_name.lower().rstrip(".")
            context = self.by_name.get(name)
            if context is not None:
                return context
            _, dot, parent = name.partition(".")
            if dot:
                context = self.by_name.get("*." + parent)
                if context is not None:
                    return context
        return self.default


class ServerTLS:
    """A TLS bind's contexts: the front context its listener holds, and the current generation.

    Hooks for the rest of fastlb: `reload()` (SIGHUP / `fastlb ctl reload`) and `expiry()` (admin API,
    /metrics)."""

    def __init__(self, address: str, certificates: list[CertificateSpec], ca: str | None = None,
                 verify: str = "none", alpn: list[str] = ALPN_PROTOCOLS) -> None:
        self.address = address
        self.alpn = alpn
        self.certificates = list(certificates)
        self.ca = ca
        self.verify = verify
        self.generation = _Generation(self.certificates, ca, verify, alpn)
        # Its own context, not one of a generation: a reload must not change the ticket keys and the
        # session cache, which stay with the context a handshake started on.
        self.front = server_context(self.certificates[0], ca, verify, alpn)
        self.front.sni_callback = self._on_server_name
        try:
            native_certificates = self._native_certificates(self.generation)
        except ValueError as exc:            # a staple file: the certificates themselves are read already
            raise TLSConfigError(f"TLS bind {address}: ocsp={exc}") from None
        self.native = self._native_context(native_certificates)
        if self.native is None and any(spec.ocsp for spec in self.certificates):
            raise TLSConfigError(f"TLS bind {address}: ocsp= needs the relay's TLS (tcp mode, no ca=, the "
                                 f"compiled relay): Python's ssl module cannot staple")

    def _native_certificates(self, generation: "_Generation") -> list:
        return [(spec.cert, spec.key, info.names, read_staple(spec.ocsp) if spec.ocsp else None)
                for spec, info in zip(self.certificates, generation.infos)]

    def _native_context(self, certificates: list):
        """The C contexts (fastlb._crelay.ServerContext) of the relay thread and the HTTP engine, or None
        (the event loop's TLS serves the bind) when the module is missing. Client certificates included:
        the HTTP engine reads the verified subject itself; the relay thread leaves mTLS binds to the event
        loop (EpollRelay.terminates)."""
        try:
            from fastlb._crelay import ServerContext
        except ImportError:
            return None
        try:
            return ServerContext(certificates, TLS12_CIPHERS, self.ca, self.verify, "h2" in self.alpn)
        except ValueError as exc:
            log.warning("TLS bind %s: served by the event loop, the relay thread cannot load it: %s",
                        self.address, exc)
            return None

    def _on_server_name(self, ssl_object: ssl.SSLObject, server_name: str | None,
                        front: ssl.SSLContext) -> None:
        # Runs once per handshake, inside OpenSSL: must not raise (an exception would abort the handshake
        # with an internal-error alert), so it only looks up and switches.
        ssl_object.fastlb_server_name = server_name
        ssl_object.context = self.generation.lookup(server_name)
        return None

    def reload(self) -> None:
        """Loads the certificate, key and CA files again. New handshakes use the new ones; connections
        already made keep theirs. On any error the current generation stays and TLSConfigError says why."""
        generation = _Generation(self.certificates, self.ca, self.verify, self.alpn)
        if self.native is not None:
            try:
                self.native.reload(self._native_certificates(generation))
            except ValueError as exc:
                raise TLSConfigError(str(exc)) from None
        self.generation = generation

    def expiry(self, now: float | None = None) -> list[tuple[str, float]]:
        """(certificate file, days left) for each certificate of the current generation."""
        return [(info.path, info.days_left(now)) for info in self.generation.infos]


def read_staple(path: str) -> bytes:
    """An OCSP response file (DER, as `openssl ocsp -respout` writes it), checked for its outer shape:
    a SEQUENCE whose first element is the response status. Raises ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    if len(data) < 5 or data[0] != 0x30 or b"\x0a\x01" not in data[:8]:
        raise ValueError(f"{path}: not a DER OCSP response")
    return data


def prepare_server_tls(binds: list["BindSpec"], alpn: list[str] = ALPN_PROTOCOLS) -> dict[int, ServerTLS]:
    """ServerTLS for each `ssl` bind, by its position in the config. Called before workers fork, so they
    share ticket keys (see the module docstring). Raises TLSConfigError. alpn: ALPN_HTTP2 where the
    HTTP mode serves HTTP/2 (alpn_for)."""
    return {index: ServerTLS(bind.address, bind.certificates, bind.ca, bind.verify, alpn)
            for index, bind in enumerate(binds) if bind.ssl}


def alpn_for(config) -> list[str]:
    """The protocols a TLS bind offers: h2 too in HTTP mode with HTTP/2 on and fastlb/http2 built."""
    if config.mode != "http" or not config.h2:
        return ALPN_PROTOCOLS
    from fastlb.http2 import available
    return ALPN_HTTP2 if available() else ALPN_PROTOCOLS


def negotiated_h2(transport) -> bool:
    """ALPN chose HTTP/2 on this TLS connection (checked once, when it is made)."""
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"


def reload_certificates(server_tls: dict[int, ServerTLS]) -> list[str]:
    """Reloads every TLS bind's certificates; returns the errors (a bind that failed keeps its current
    certificates). The hook for hot reload."""
    errors = []
    for tls in server_tls.values():
        try:
            tls.reload()
        except TLSConfigError as exc:
            errors.append(f"{tls.address}: {exc}")
    return errors


def certificate_expiry(server_tls: dict[int, ServerTLS], now: float | None = None
                       ) -> list[tuple[str, str, float]]:
    """(bind address, certificate file, days left) for every certificate served: the hook for /metrics
    (`fastlb_certificate_expiry_days{bind=..., cert=...}`) and the admin API."""
    return [(tls.address, path, days) for tls in server_tls.values() for path, days in tls.expiry(now)]


# ---- what a terminated connection tells the HTTP mode -----------------------------------------------

@dataclass(frozen=True, slots=True)
class TLSInfo:
    """A TLS client connection, for the HTTP mode: `X-Forwarded-Proto: https` when there is one, and
    CLIENT_SUBJECT_HEADER from client_subject (None: no client certificate)."""
    version: str                  # "TLSv1.3"
    cipher: str
    alpn: str | None
    server_name: str | None       # the SNI the client sent
    client_subject: str | None    # RFC 4514 DN of a verified client certificate, e.g. "CN=alice,O=Org"


def connection_tls_info(transport: Any) -> TLSInfo | None:
    """TLSInfo of a transport accepted on a TLS bind, None on a plain one. Once per connection."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    # With verify=optional/required, OpenSSL refuses an invalid certificate during the handshake, so a
    # certificate here is a verified one; getpeercert() returns {} when the bind does not verify.
    peer = ssl_object.getpeercert() or None
    cipher = ssl_object.cipher()
    return TLSInfo(
        version=ssl_object.version(),
        cipher=cipher[0] if cipher else "",
        alpn=ssl_object.selected_alpn_protocol(),
        server_name=getattr(ssl_object, "fastlb_server_name", None),
        client_subject=format_subject(peer["subject"]) if peer and "subject" in peer else None)


_SHORT_NAMES = {"commonName": "CN", "countryName": "C", "organizationName": "O",
                "organizationalUnitName": "OU", "localityName": "L", "stateOrProvinceName": "ST",
                "streetAddress": "STREET", "domainComponent": "DC", "userId": "UID"}


def format_subject(subject: tuple) -> str:
    """ssl's subject tuple -> an RFC 4514 string: most specific RDN first, special characters escaped,
    so the value is safe in a header and parseable by a backend."""
    def escape(value: str) -> str:
        out = []
        for i, char in enumerate(value):
            if char in ',+"\\<>;=' or (char == "#" and i == 0) or (char == " " and i in (0, len(value) - 1)):
                out.append("\\" + char)
            elif ord(char) < 0x20 or ord(char) == 0x7f:
                out.append(f"\\{ord(char):02x}")
            else:
                out.append(char)
        return "".join(out)
    rdns = ["+".join(f"{_SHORT_NAMES.get(key, key)}={escape(value)}" for key, value in rdn)
            for rdn in subject]
    return ",".join(reversed(rdns))


# ---- client side (backends) ------------------------------------------------------------------------

def backend_context(verify: str | None) -> ssl.SSLContext:
    """Context for `ssl` backends: verify=None checks against the system CA store, a file against that
    file; "none" turns verification off (explicitly asked for: logged at start)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if verify == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif verify:
        try:
            context.load_verify_locations(cafile=verify)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot load CA file {verify}: {_describe(exc)}") from None
    else:
        context.load_default_certs()
    return context


def backend_contexts(backends: list["BackendSpec"]) -> dict[str | None, ssl.SSLContext]:
    """One client context per distinct `verify` setting of the ssl backends (contexts are shared: they
    also hold the client-side session cache)."""
    contexts: dict[str | None, ssl.SSLContext] = {}
    for spec in backends:
        if not spec.ssl:
            continue
        if spec.verify not in contexts:
            contexts[spec.verify] = backend_context(spec.verify)
        if spec.verify == "none":
            log.warning("backend %s: TLS certificate verification is off (verify=none)", spec.address)
    return contexts
