# TLS on the HTTP engine's client connections (included by fastlb/http/_fast.pyx after its structs).
#
# A client of a TLS bind has an SSL* (c.tls.ssl) on its socket, made from the front SSL_CTX of the bind's
# fastlb.tls.ServerTLS.native (fastlb/_ctls.pxi: SNI certificate sets, session tickets shared by every
# worker, client certificates, ALPN h2 and http/1.1, tls.py's safe settings). Every read and write of a
# client goes through client_recv / client_send (and the engine's write_answer, which gives TLS one contiguous
# buffer), so a protocol sitting on the connection never sees whether it is TLS. A client whose ALPN chose
# h2 is handed, right after its handshake, to the Python path's HTTP/2 (fastlb/http2/) over the engine's
# TLS tunnel (Engine.adopt).
#
# The return conventions, the same for plain and TLS sockets:
#   client_recv: > 0 bytes read; 0 the client's end (FIN or close_notify); WOULD_BLOCK; FAILED.
#   client_send: bytes taken (0: would block; with TLS all or nothing, and the retry must offer the same
#                bytes again, which the pending buffer does: SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER); FAILED.

cdef enum:
    WOULD_BLOCK = -1
    FAILED = -2

# What ALPN agreed on (ClientTls.alpn).
cdef enum:
    ALPN_NONE = 0
    ALPN_HTTP11 = 1
    ALPN_H2 = 2


cdef long note_short_read(BIO *b, int oper, const char *argp, size_t size, int argi, long argl, int ret,
                          size_t *processed) noexcept nogil:
    """The socket BIO's callback: after each read, whether it got less than it asked for (the socket is
    drained: with read-ahead OpenSSL asks for its whole free buffer). client_recv then stops without the
    read that would only say EAGAIN; bytes arriving later raise a new edge."""
    if oper == BIO_CB_READ | BIO_CB_RETURN:
        (<unsigned char *>BIO_get_callback_arg(b))[0] = ret > 0 and processed[0] < size
        return ret
    if oper & BIO_CB_RETURN:
        return ret
    return 1


cdef inline bint tls_prepare(Client *c, SSL_CTX *ctx, int fd) noexcept:
    """c's SSL on fd, server side (c.tls is set); False when OpenSSL could not make it."""
    cdef BIO *bio
    c.tls.ssl = SSL_new(ctx)
    if c.tls.ssl == NULL or SSL_set_fd(c.tls.ssl, fd) != 1:
        ERR_clear_error()
        return False
    SSL_set_accept_state(c.tls.ssl)
    # A record in one recv, not its header then its body; and told when that recv drained the socket.
    SSL_set_read_ahead(c.tls.ssl, 1)
    bio = SSL_get_rbio(c.tls.ssl)
    BIO_set_callback_arg(bio, <char *>&c.tls.short_read)
    BIO_set_callback_ex(bio, note_short_read)
    return True


cdef inline ssize_t client_recv(Client *c, char *buf, size_t size) noexcept:
    cdef ssize_t n
    cdef size_t total = 0
    cdef int r, err
    if c.tls == NULL:
        while True:
            n = recv(c.fd, buf, size, 0)
            if n >= 0:
                return n
            if errno == EINTR:
                continue
            return WOULD_BLOCK if errno == EAGAIN else FAILED
    # Until the records in hand are read or buf is full: edge-triggered, nothing announces records
    # OpenSSL has buffered already. Stops early when the last socket read drained the socket.
    c.tls.short_read = 0
    while total < size:
        r = SSL_read(c.tls.ssl, buf + total, <int>min(size - total, 1 << 30))
        if r > 0:
            total += r
            if c.tls.short_read and not SSL_has_pending(c.tls.ssl):
                break               # the socket had no more, OpenSSL holds no more: all there is
            continue
        err = SSL_get_error(c.tls.ssl, r)
        if err == SSL_ERROR_WANT_READ or err == SSL_ERROR_WANT_WRITE:
            break
        ERR_clear_error()            # the queue is the thread's: a stale error would fail the next call
        if total:
            c.hung_up = 1            # the end after the bytes: read again once they are answered
            break
        return 0 if err == SSL_ERROR_ZERO_RETURN else FAILED
    return total if total else WOULD_BLOCK


cdef inline ssize_t client_send(Client *c, const char *buf, size_t size) noexcept:
    cdef ssize_t n
    cdef int r, err
    if c.tls == NULL:
        while True:
            n = send(c.fd, buf, size, MSG_NOSIGNAL)
            if n >= 0:
                return n
            if errno == EINTR:
                continue
            return 0 if errno == EAGAIN else FAILED
    r = SSL_write(c.tls.ssl, buf, <int>size)
    if r > 0:
        return r
    err = SSL_get_error(c.tls.ssl, r)
    if err == SSL_ERROR_WANT_WRITE or err == SSL_ERROR_WANT_READ:
        return 0
    ERR_clear_error()
    return FAILED


cdef void tls_end(Client *c, bint clean) noexcept:
    """Frees the client's SSL (the socket stays); clean: a close_notify first (one try, as uvloop's
    transport does on close)."""
    if c.tls == NULL or c.tls.ssl == NULL:
        return
    if clean:
        SSL_shutdown(c.tls.ssl)
    ERR_clear_error()
    SSL_free(c.tls.ssl)
    c.tls.ssl = NULL


cdef unsigned char alpn_of(SSL *ssl) noexcept:
    cdef const unsigned char *data = NULL
    cdef unsigned int size = 0
    SSL_get0_alpn_selected(ssl, &data, &size)
    if size == 8 and memcmp(data, b"http/1.1", 8) == 0:
        return ALPN_HTTP11
    if size == 2 and memcmp(data, b"h2", 2) == 0:
        return ALPN_H2
    return ALPN_NONE


cdef object peer_subject(SSL *ssl):
    """The verified client certificate's subject as Python's SSLObject.getpeercert()["subject"] gives it
    (a tuple of RDNs, each a tuple of (long attribute name, value)), for tls.format_subject; None
    without one (getpeercert() is {} when the bind does not verify)."""
    cdef X509 *cert
    cdef X509_NAME *name
    cdef X509_NAME_ENTRY *entry
    cdef unsigned char *value
    cdef char attribute[256]
    cdef int i, size, rdn = -1, count
    cdef list rdns = [], current = None
    if not SSL_get_verify_mode(ssl) & SSL_VERIFY_PEER:
        return None
    cert = SSL_get1_peer_certificate(ssl)
    if cert == NULL:
        return None
    try:
        name = X509_get_subject_name(cert)
        count = X509_NAME_entry_count(name)
        for i in range(count):
            entry = X509_NAME_get_entry(name, i)
            if current is None or X509_NAME_ENTRY_set(entry) != rdn:
                rdn = X509_NAME_ENTRY_set(entry)
                current = []
                rdns.append(current)
            OBJ_obj2txt(attribute, sizeof(attribute), X509_NAME_ENTRY_get_object(entry), 0)
            size = ASN1_STRING_to_UTF8(&value, X509_NAME_ENTRY_get_data(entry))
            if size < 0:
                ERR_clear_error()
                return None
            try:
                current.append((attribute.decode("utf-8", "replace"), value[:size].decode("utf-8", "replace")))
            finally:
                OPENSSL_free(value)
    finally:
        X509_free(cert)
    return tuple(tuple(r) for r in rdns)
