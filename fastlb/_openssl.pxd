# OpenSSL declarations shared by the relay thread's TLS (fastlb/_ctls.pxi, included by _crelay.pyx) and the
# HTTP engine's (fastlb/http/_fast.pyx): one copy, cimported by both (`from fastlb._openssl cimport *`).

cdef extern from "<openssl/ssl.h>" nogil:
    ctypedef struct SSL_CTX:
        pass
    ctypedef struct SSL:
        pass
    ctypedef struct SSL_METHOD:
        pass
    const SSL_METHOD *TLS_server_method()
    SSL_CTX *SSL_CTX_new(const SSL_METHOD *method)
    void SSL_CTX_free(SSL_CTX *ctx)
    int SSL_CTX_set_min_proto_version(SSL_CTX *ctx, int version)
    int SSL_CTX_set_max_proto_version(SSL_CTX *ctx, int version)
    int SSL_CTX_set_cipher_list(SSL_CTX *ctx, const char *s)
    unsigned long long SSL_CTX_set_options(SSL_CTX *ctx, unsigned long long op)
    long SSL_CTX_set_mode(SSL_CTX *ctx, long mode)
    int SSL_CTX_use_certificate_chain_file(SSL_CTX *ctx, const char *file)
    int SSL_CTX_use_PrivateKey_file(SSL_CTX *ctx, const char *file, int type)
    int SSL_CTX_check_private_key(const SSL_CTX *ctx)
    ctypedef int (*alpn_cb_t)(SSL *s, const unsigned char **out, unsigned char *outlen,
                              const unsigned char *inp, unsigned int inlen, void *arg) noexcept nogil
    void SSL_CTX_set_alpn_select_cb(SSL_CTX *ctx, alpn_cb_t cb, void *arg)
    int SSL_select_next_proto(unsigned char **out, unsigned char *outlen, const unsigned char *server,
                              unsigned int server_len, const unsigned char *client, unsigned int client_len)
    ctypedef int (*servername_cb_t)(SSL *s, int *al, void *arg) noexcept nogil
    long SSL_CTX_set_tlsext_servername_callback(SSL_CTX *ctx, servername_cb_t cb)
    long SSL_CTX_set_tlsext_servername_arg(SSL_CTX *ctx, void *arg)
    const char *SSL_get_servername(const SSL *s, int type)
    SSL_CTX *SSL_set_SSL_CTX(SSL *ssl, SSL_CTX *ctx)
    SSL *SSL_new(SSL_CTX *ctx)
    void SSL_free(SSL *ssl)
    int SSL_set_fd(SSL *ssl, int fd)
    void SSL_set_accept_state(SSL *ssl)
    int SSL_do_handshake(SSL *ssl)
    int SSL_read(SSL *ssl, void *buf, int num)
    int SSL_write(SSL *ssl, const void *buf, int num)
    int SSL_shutdown(SSL *ssl)
    int SSL_get_error(const SSL *ssl, int ret)
    int SSL_has_pending(const SSL *ssl)
    int SSL_session_reused(const SSL *ssl)
    # Client certificates (mTLS binds) and what a handshake agreed on (the HTTP engine).
    ctypedef int (*verify_cb_t)(int ok, void *store) noexcept nogil
    int SSL_CTX_load_verify_locations(SSL_CTX *ctx, const char *cafile, const char *capath)
    void SSL_CTX_set_verify(SSL_CTX *ctx, int mode, verify_cb_t callback)
    int SSL_CTX_set_session_id_context(SSL_CTX *ctx, const unsigned char *sid_ctx, unsigned int sid_ctx_len)
    int SSL_get_verify_mode(const SSL *ssl)
    void SSL_get0_alpn_selected(const SSL *ssl, const unsigned char **data, unsigned int *len)
    void SSL_set_read_ahead(SSL *s, int yes)

cdef extern from "<openssl/bio.h>" nogil:
    # A callback on the socket BIO tells the HTTP engine when a read found the socket drained.
    ctypedef struct BIO:
        pass
    ctypedef long (*bio_callback_ex_t)(BIO *b, int oper, const char *argp, size_t len, int argi, long argl,
                                       int ret, size_t *processed) noexcept nogil
    void BIO_set_callback_ex(BIO *b, bio_callback_ex_t callback)
    void BIO_set_callback_arg(BIO *b, char *arg)
    char *BIO_get_callback_arg(const BIO *b)
    enum:
        BIO_CB_READ, BIO_CB_RETURN

cdef extern from "<openssl/ssl.h>" nogil:
    BIO *SSL_get_rbio(const SSL *s)
    enum:
        TLS1_2_VERSION, TLS1_3_VERSION, SSL_FILETYPE_PEM, TLSEXT_NAMETYPE_host_name
        SSL_TLSEXT_ERR_OK, SSL_TLSEXT_ERR_NOACK, OPENSSL_NPN_NEGOTIATED
        SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE, SSL_ERROR_ZERO_RETURN
        SSL_OP_NO_COMPRESSION, SSL_OP_NO_RENEGOTIATION, SSL_OP_CIPHER_SERVER_PREFERENCE
        SSL_OP_SINGLE_ECDH_USE, SSL_OP_IGNORE_UNEXPECTED_EOF, SSL_OP_ALL, SSL_OP_NO_SSLv2, SSL_OP_NO_SSLv3
        SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, SSL_MODE_RELEASE_BUFFERS
        SSL_ERROR_SYSCALL, SSL_ERROR_SSL
        SSL_VERIFY_NONE, SSL_VERIFY_PEER, SSL_VERIFY_FAIL_IF_NO_PEER_CERT

    # OCSP stapling (macros in OpenSSL, called like functions)
    ctypedef int (*status_cb_t)(SSL *s, void *arg) noexcept nogil
    long SSL_CTX_set_tlsext_status_cb(SSL_CTX *ctx, status_cb_t cb)
    long SSL_set_tlsext_status_ocsp_resp(SSL *s, unsigned char *resp, long length)
    SSL_CTX *SSL_get_SSL_CTX(const SSL *s)
    int SSL_CTX_set_ex_data(SSL_CTX *ctx, int idx, void *data)
    void *SSL_CTX_get_ex_data(const SSL_CTX *ctx, int idx)

cdef extern from "<openssl/crypto.h>" nogil:
    ctypedef struct CRYPTO_EX_DATA:
        pass
    ctypedef void (*ex_free_t)(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl,
                               void *argp) noexcept nogil
    int CRYPTO_get_ex_new_index(int class_index, long argl, void *argp, void *new_func, void *dup_func,
                                ex_free_t free_func)
    void *OPENSSL_malloc(size_t num)
    enum:
        CRYPTO_EX_INDEX_SSL_CTX

cdef extern from "<openssl/err.h>" nogil:
    unsigned long ERR_get_error()
    void ERR_clear_error()
    void ERR_error_string_n(unsigned long e, char *buf, size_t len)


cdef extern from "<openssl/x509.h>" nogil:
    # A client certificate's subject, read once per mTLS connection (fastlb/http/_fast.pyx).
    ctypedef struct X509:
        pass
    ctypedef struct X509_NAME:
        pass
    ctypedef struct X509_NAME_ENTRY:
        pass
    ctypedef struct ASN1_OBJECT:
        pass
    ctypedef struct ASN1_STRING:
        pass
    X509_NAME *X509_get_subject_name(const X509 *x)
    int X509_NAME_entry_count(const X509_NAME *name)
    X509_NAME_ENTRY *X509_NAME_get_entry(const X509_NAME *name, int loc)
    int X509_NAME_ENTRY_set(const X509_NAME_ENTRY *ne)
    ASN1_OBJECT *X509_NAME_ENTRY_get_object(const X509_NAME_ENTRY *ne)
    ASN1_STRING *X509_NAME_ENTRY_get_data(const X509_NAME_ENTRY *ne)
    int ASN1_STRING_to_UTF8(unsigned char **out, const ASN1_STRING *inp)
    int OBJ_obj2txt(char *buf, int buf_len, const ASN1_OBJECT *a, int no_name)
    void X509_free(X509 *a)

cdef extern from "<openssl/ssl.h>" nogil:
    X509 *SSL_get1_peer_certificate(const SSL *s)
    void OPENSSL_free(void *addr)
