# OpenSSL server contexts for the relay thread's TLS termination (included by _crelay.pyx).
#
# A `ServerContext` mirrors fastlb/tls.py's ServerTLS for one bind: a *front* SSL_CTX that every handshake
# starts on (it holds the session cache and the ticket keys, so they survive a certificate reload, and
# because it is made before the workers fork, every worker has the same ticket keys), and a generation
# of one SSL_CTX per certificate that the servername callback switches the handshake to: exact name,
# then `*.parent`, then the first certificate. Same settings as tls.py's `_hardened`: TLS 1.2-1.3, the
# TLS 1.2 cipher list given, server preference, no compression, no renegotiation, ALPN http/1.1 (h2 first
# where the HTTP mode serves HTTP/2: tls.alpn_for; the HTTP engine hands such connections to fastlb/http2).

from libc.string cimport strlen, strcmp, strchr, memcpy
from libc.stdlib cimport malloc, free, calloc

from fastlb._openssl cimport *

cdef struct Generation:
    int nctx
    SSL_CTX **ctxs            # one per certificate; ctxs[0] is the default
    int nnames
    char **names              # lower case, as fastlb.tls.read_certificate gives them
    int *name_ctx             # names[i] -> ctxs[name_ctx[i]]

cdef struct TLSConf:
    pthread_mutex_t lock      # guards `gen` (the callback runs in the relay thread, reload in Python's)
    Generation *gen
    SSL_CTX *front


# The protocols a context offers, in ALPN's wire form (each length-prefixed), in the server's preference.
cdef const char *ALPN_HTTP11 = b"\x08http/1.1"
cdef const char *ALPN_H2_HTTP11 = b"\x02h2\x08http/1.1"

cdef int select_alpn(SSL *s, const unsigned char **out, unsigned char *outlen, const unsigned char *inp,
                     unsigned int inlen, void *arg) noexcept nogil:
    # arg: the context's ALPN_* list. As Python's ssl module does: the first of ours the client offers;
    # no protocol in common, no ALPN in the answer (not a failure).
    cdef const char *offered = <const char *>arg
    if SSL_select_next_proto(<unsigned char **>out, outlen, <const unsigned char *>offered,
                             <unsigned int>strlen(offered), inp, inlen) == OPENSSL_NPN_NEGOTIATED:
        return SSL_TLSEXT_ERR_OK
    return SSL_TLSEXT_ERR_NOACK


cdef SSL_CTX *lookup(Generation *gen, const char *server_name) noexcept nogil:
    """tls._Generation.lookup: the exact name, then `*.parent`, then the default."""
    cdef char name[256]
    cdef size_t n, i
    cdef char *dot
    cdef int k
    if server_name != NULL:
        n = strlen(server_name)
        while n and server_name[n - 1] == b'.':
            n -= 1
        if 0 < n < 250:
            for i in range(n):
                name[i] = server_name[i] + 32 if b'A' <= server_name[i] <= b'Z' else server_name[i]
            name[n] = 0
            for k in range(gen.nnames):
                if strcmp(gen.names[k], name) == 0:
                    return gen.ctxs[gen.name_ctx[k]]
            dot = strchr(name, b'.')
            if dot != NULL and dot[1] != 0:
                # "*.parent": write the wildcard over the first label, in place
                (dot - 1)[0] = b'*'
                for k in range(gen.nnames):
                    if strcmp(gen.names[k], dot - 1) == 0:
                        return gen.ctxs[gen.name_ctx[k]]
    return gen.ctxs[0]


cdef int on_server_name(SSL *s, int *al, void *arg) noexcept nogil:
    """Runs on every ClientHello (with or without SNI): switches the handshake to the certificate's
    context of the current generation."""
    cdef TLSConf *conf = <TLSConf *>arg
    pthread_mutex_lock(&conf.lock)
    SSL_set_SSL_CTX(s, lookup(conf.gen, SSL_get_servername(s, TLSEXT_NAMETYPE_host_name)))
    pthread_mutex_unlock(&conf.lock)
    return SSL_TLSEXT_ERR_OK


cdef str openssl_error():
    cdef char buf[256]
    cdef unsigned long code = ERR_get_error()
    cdef unsigned long last = code
    while last:                      # the first error is the root cause; drain the rest
        last = ERR_get_error()
    if not code:
        return "unknown error"
    ERR_error_string_n(code, buf, sizeof(buf))
    return buf.decode("utf-8", "replace")


# OCSP stapling: a context's DER response, as the context's ex_data (freed with the context: a reload
# frees a generation while handshakes begun on it may still staple).
cdef struct Staple:
    long length
    unsigned char data[1]


cdef void free_staple(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp) noexcept nogil:
    free(ptr)


cdef int STAPLE_INDEX = CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_SSL_CTX, 0, NULL, NULL, NULL, free_staple)


cdef int on_status_request(SSL *s, void *arg) noexcept nogil:
    """A client asked for the certificate's status: the staple of the context the handshake is on (a
    copy: OpenSSL frees it), or nothing."""
    cdef Staple *staple = <Staple *>SSL_CTX_get_ex_data(SSL_get_SSL_CTX(s), STAPLE_INDEX)
    cdef unsigned char *copy
    if staple == NULL:
        return SSL_TLSEXT_ERR_NOACK
    copy = <unsigned char *>OPENSSL_malloc(staple.length)
    if copy == NULL:
        return SSL_TLSEXT_ERR_NOACK
    memcpy(copy, staple.data, staple.length)
    SSL_set_tlsext_status_ocsp_resp(s, copy, staple.length)
    return SSL_TLSEXT_ERR_OK


cdef int set_staple(SSL_CTX *ctx, bytes response) except -1:
    cdef Staple *staple = <Staple *>malloc(sizeof(Staple) + len(response))
    if staple == NULL:
        raise MemoryError()
    staple.length = len(response)
    memcpy(staple.data, <const char *>response, len(response))
    SSL_CTX_set_ex_data(ctx, STAPLE_INDEX, staple)
    SSL_CTX_set_tlsext_status_cb(ctx, on_status_request)
    return 0


cdef SSL_CTX *new_context(bytes ciphers, bytes cert, bytes key, bytes ca=None, int verify=SSL_VERIFY_NONE,
                          const char *alpn=ALPN_HTTP11) except NULL:
    """One context with tls.py's settings and a certificate (`key`: None when cert holds it); with `ca`,
    client certificates are checked against it with `verify` (SSL_VERIFY_* as tls.VERIFY_MODES' ssl
    constants map to them); alpn: the protocols it agrees to (ALPN_*)."""
    cdef SSL_CTX *ctx = SSL_CTX_new(TLS_server_method())
    if ctx == NULL:
        raise ValueError(openssl_error())
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION)
    SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION)
    # Python's ssl module defaults (SSL_OP_ALL, no SSLv2/3), then tls.py's hardening; and an EOF without
    # close_notify is an EOF (what uvloop's TLS transport does), not an error.
    SSL_CTX_set_options(ctx, SSL_OP_ALL | SSL_OP_NO_SSLv2 | SSL_OP_NO_SSLv3 | SSL_OP_NO_COMPRESSION
                        | SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_SINGLE_ECDH_USE
                        | SSL_OP_IGNORE_UNEXPECTED_EOF)
    # A write that found the socket full is retried from the connection's pending buffer (moved);
    # idle connections give their record buffers back.
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_RELEASE_BUFFERS)
    SSL_CTX_set_alpn_select_cb(ctx, select_alpn, <void *>alpn)
    if (SSL_CTX_set_cipher_list(ctx, ciphers) != 1
            or SSL_CTX_use_certificate_chain_file(ctx, cert) != 1
            or SSL_CTX_use_PrivateKey_file(ctx, key if key is not None else cert, SSL_FILETYPE_PEM) != 1
            or SSL_CTX_check_private_key(ctx) != 1):
        SSL_CTX_free(ctx)
        raise ValueError(f"{cert.decode(errors='replace')}: {openssl_error()}")
    if ca is not None:
        if SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1:
            SSL_CTX_free(ctx)
            raise ValueError(f"{ca.decode(errors='replace')}: {openssl_error()}")
        SSL_CTX_set_verify(ctx, verify, NULL)
    # Resumed sessions are only accepted for the context they were made in (OpenSSL refuses to resume
    # on a verifying server without one; Python's ssl module sets one too).
    SSL_CTX_set_session_id_context(ctx, <const unsigned char *>SESSION_ID_CONTEXT, len(SESSION_ID_CONTEXT))
    return ctx


cdef bytes SESSION_ID_CONTEXT = b"fastlb"
# tls.VERIFY_MODES' names -> OpenSSL's flags (ssl.CERT_OPTIONAL / CERT_REQUIRED are these).
VERIFY_FLAGS = {"none": SSL_VERIFY_NONE, "optional": SSL_VERIFY_PEER,
                "required": SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT}


cdef void free_generation(Generation *gen) noexcept nogil:
    cdef int i
    if gen == NULL:
        return
    if gen.ctxs != NULL:
        for i in range(gen.nctx):
            if gen.ctxs[i] != NULL:
                SSL_CTX_free(gen.ctxs[i])      # reference counted: live connections keep theirs
    if gen.names != NULL:
        for i in range(gen.nnames):
            free(gen.names[i])
    free(gen.ctxs)
    free(gen.names)
    free(gen.name_ctx)
    free(gen)


cdef Generation *new_generation(bytes ciphers, list certificates, bytes ca, int verify, const char *alpn
                                ) except NULL:
    cdef Generation *gen = <Generation *>calloc(1, sizeof(Generation))
    cdef int i, k = 0
    cdef bytes name
    cdef Py_ssize_t nnames = sum(len(names) for _, _, names, _ in certificates)
    if gen == NULL:
        raise MemoryError()
    gen.ctxs = <SSL_CTX **>calloc(len(certificates), sizeof(SSL_CTX *))
    gen.names = <char **>calloc(nnames + 1, sizeof(char *))
    gen.name_ctx = <int *>calloc(nnames + 1, sizeof(int))
    if gen.ctxs == NULL or gen.names == NULL or gen.name_ctx == NULL:
        free_generation(gen)
        raise MemoryError()
    try:
        for i, (cert, key, names, staple) in enumerate(certificates):
            gen.ctxs[i] = new_context(ciphers, cert, key, ca, verify, alpn)
            gen.nctx = i + 1
            if staple is not None:
                set_staple(gen.ctxs[i], staple)
            for name in names:
                gen.names[k] = <char *>malloc(len(name) + 1)
                if gen.names[k] == NULL:
                    raise MemoryError()
                memcpy(gen.names[k], <char *>name, len(name) + 1)
                gen.name_ctx[k] = i
                k += 1
                gen.nnames = k
    except BaseException:
        free_generation(gen)
        raise
    return gen


cdef class ServerContext:
    """The OpenSSL contexts of one TLS bind for the relay thread.

    `certificates`: [(cert PEM path, key path or None, (server names, lower case), OCSP response (DER
    bytes) or None), ...], the first the default; `ciphers`: the TLS 1.2 cipher list; `ca` and `verify`
    ("none", "optional", "required", as tls.VERIFY_MODES): client certificates; h2: ALPN offers h2 before
    http/1.1 (tls.alpn_for). Raises ValueError naming the file and OpenSSL's reason. The HTTP engine
    (fastlb/http/_fast.pyx) starts its handshakes on `front_address()`."""

    cdef TLSConf *conf
    cdef readonly str ciphers
    cdef bytes ca
    cdef int verify
    cdef readonly bint verifies      # asks for client certificates (verify optional or required)
    cdef const char *alpn            # ALPN_HTTP11 or ALPN_H2_HTTP11 (static)

    def __cinit__(self, list certificates, str ciphers, str ca=None, str verify="none", bint h2=False):
        cdef TLSConf *conf = <TLSConf *>calloc(1, sizeof(TLSConf))
        if conf == NULL:
            raise MemoryError()
        pthread_mutex_init(&conf.lock, NULL)
        self.conf = conf
        certificates = self._encode(certificates)
        first_cert, first_key, _, _ = certificates[0]
        self.ca = ca.encode() if ca else None
        self.verify = VERIFY_FLAGS[verify] if ca else SSL_VERIFY_NONE
        self.verifies = self.verify != SSL_VERIFY_NONE
        self.alpn = ALPN_H2_HTTP11 if h2 else ALPN_HTTP11
        conf.front = new_context(ciphers.encode(), first_cert, first_key, self.ca, self.verify, self.alpn)
        SSL_CTX_set_tlsext_servername_callback(conf.front, on_server_name)
        SSL_CTX_set_tlsext_servername_arg(conf.front, conf)
        conf.gen = new_generation(ciphers.encode(), certificates, self.ca, self.verify, self.alpn)
        self.ciphers = ciphers

    @staticmethod
    def _encode(list certificates):
        return [(cert.encode(), key.encode() if key else None, [n.encode() for n in names], staple)
                for cert, key, names, staple in certificates]

    def reload(self, list certificates):
        """Loads the certificates again: new handshakes use them, established connections keep theirs.
        On error (ValueError) the current ones stay."""
        cdef Generation *gen = new_generation(self.ciphers.encode(), self._encode(certificates), self.ca,
                                              self.verify, self.alpn)
        cdef Generation *old
        pthread_mutex_lock(&self.conf.lock)
        old = self.conf.gen
        self.conf.gen = gen
        pthread_mutex_unlock(&self.conf.lock)
        free_generation(old)

    def front_address(self):
        """The front SSL_CTX's address, for the HTTP engine's SSL_new (valid while this object lives)."""
        return <size_t>self.conf.front

    def __dealloc__(self):
        if self.conf == NULL:
            return
        free_generation(self.conf.gen)
        if self.conf.front != NULL:
            SSL_CTX_free(self.conf.front)
        pthread_mutex_destroy(&self.conf.lock)
        free(self.conf)
