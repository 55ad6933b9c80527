# libnghttp2's declarations (libnghttp2-dev), shared by the Python path's sessions (fastlb/http2/_nghttp2.pyx)
# and the HTTP engine's (fastlb/http/_eh2.pxi).
from libc.stdint cimport uint8_t, uint32_t, int32_t, uint64_t

cdef extern from "nghttp2/nghttp2.h":
    ctypedef struct nghttp2_session:
        pass
    ctypedef struct nghttp2_session_callbacks:
        pass
    ctypedef struct nghttp2_option:
        pass
    ctypedef struct nghttp2_frame_hd:
        size_t length
        int32_t stream_id
        uint8_t type
        uint8_t flags
    ctypedef enum nghttp2_headers_category:
        NGHTTP2_HCAT_REQUEST
        NGHTTP2_HCAT_RESPONSE
        NGHTTP2_HCAT_PUSH_RESPONSE
        NGHTTP2_HCAT_HEADERS
    ctypedef struct nghttp2_headers:
        nghttp2_frame_hd hd
        nghttp2_headers_category cat
    ctypedef union nghttp2_frame:
        nghttp2_frame_hd hd
        nghttp2_headers headers
    ctypedef struct nghttp2_nv:
        uint8_t *name
        uint8_t *value
        size_t namelen
        size_t valuelen
        uint8_t flags
    ctypedef struct nghttp2_settings_entry:
        int32_t settings_id
        uint32_t value
    ctypedef union nghttp2_data_source:
        int fd
        void *ptr
    ctypedef ssize_t (*nghttp2_data_source_read_callback)(
        nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
        uint32_t *data_flags, nghttp2_data_source *source, void *user_data)
    ctypedef struct nghttp2_data_provider:
        nghttp2_data_source source
        nghttp2_data_source_read_callback read_callback

    enum:
        NGHTTP2_DATA
        NGHTTP2_HEADERS
        NGHTTP2_PRIORITY
        NGHTTP2_RST_STREAM
        NGHTTP2_SETTINGS
        NGHTTP2_PING
        NGHTTP2_GOAWAY
        NGHTTP2_WINDOW_UPDATE
        NGHTTP2_FLAG_NONE
        NGHTTP2_FLAG_END_STREAM
        NGHTTP2_DATA_FLAG_EOF
        NGHTTP2_DATA_FLAG_NO_END_STREAM
        NGHTTP2_NV_FLAG_NONE
        NGHTTP2_ERR_DEFERRED
        NGHTTP2_ERR_CALLBACK_FAILURE
        NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE
        NGHTTP2_NO_ERROR
        NGHTTP2_PROTOCOL_ERROR
        NGHTTP2_INTERNAL_ERROR
        NGHTTP2_REFUSED_STREAM
        NGHTTP2_CANCEL
        NGHTTP2_ENHANCE_YOUR_CALM
        NGHTTP2_SETTINGS_HEADER_TABLE_SIZE
        NGHTTP2_SETTINGS_ENABLE_PUSH
        NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
        NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
        NGHTTP2_SETTINGS_MAX_FRAME_SIZE
        NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE

    ctypedef int (*on_frame_recv_cb)(nghttp2_session *, const nghttp2_frame *, void *)
    ctypedef int (*on_begin_headers_cb)(nghttp2_session *, const nghttp2_frame *, void *)
    ctypedef int (*on_header_cb)(nghttp2_session *, const nghttp2_frame *, const uint8_t *, size_t,
                                 const uint8_t *, size_t, uint8_t, void *)
    ctypedef int (*on_data_chunk_recv_cb)(nghttp2_session *, uint8_t, int32_t, const uint8_t *, size_t,
                                          void *)
    ctypedef int (*on_stream_close_cb)(nghttp2_session *, int32_t, uint32_t, void *)

    int nghttp2_session_callbacks_new(nghttp2_session_callbacks **)
    void nghttp2_session_callbacks_del(nghttp2_session_callbacks *)
    void nghttp2_session_callbacks_set_on_frame_recv_callback(nghttp2_session_callbacks *, on_frame_recv_cb)
    void nghttp2_session_callbacks_set_on_begin_headers_callback(nghttp2_session_callbacks *,
                                                                 on_begin_headers_cb)
    void nghttp2_session_callbacks_set_on_header_callback(nghttp2_session_callbacks *, on_header_cb)
    void nghttp2_session_callbacks_set_on_data_chunk_recv_callback(nghttp2_session_callbacks *,
                                                                   on_data_chunk_recv_cb)
    void nghttp2_session_callbacks_set_on_stream_close_callback(nghttp2_session_callbacks *,
                                                                on_stream_close_cb)

    int nghttp2_option_new(nghttp2_option **)
    void nghttp2_option_del(nghttp2_option *)
    void nghttp2_option_set_no_auto_window_update(nghttp2_option *, int)
    void nghttp2_option_set_max_outbound_ack(nghttp2_option *, size_t)
    void nghttp2_option_set_max_settings(nghttp2_option *, size_t)
    void nghttp2_option_set_stream_reset_rate_limit(nghttp2_option *, uint64_t, uint64_t)
    void nghttp2_option_set_max_continuations(nghttp2_option *, size_t)
    void nghttp2_option_set_max_deflate_dynamic_table_size(nghttp2_option *, size_t)

    int nghttp2_session_client_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *,
                                    const nghttp2_option *)
    int32_t nghttp2_submit_request(nghttp2_session *, const void *, const nghttp2_nv *, size_t,
                                   const nghttp2_data_provider *, void *)
    int nghttp2_submit_trailer(nghttp2_session *, int32_t, const nghttp2_nv *, size_t)
    uint32_t nghttp2_session_get_remote_settings(nghttp2_session *, int)
    int nghttp2_session_server_new2(nghttp2_session **, const nghttp2_session_callbacks *, void *,
                                    const nghttp2_option *)
    # A session's own allocator (the engine's block pool: fastlb/http/_eh2.pxi).
    ctypedef struct nghttp2_mem:
        void *mem_user_data
        void *(*mem_malloc "malloc")(size_t, void *) noexcept
        void (*mem_free "free")(void *, void *) noexcept
        void *(*mem_calloc "calloc")(size_t, size_t, void *) noexcept
        void *(*mem_realloc "realloc")(void *, size_t, void *) noexcept
    int nghttp2_session_server_new3(nghttp2_session **, const nghttp2_session_callbacks *, void *,
                                    const nghttp2_option *, nghttp2_mem *)
    void nghttp2_session_del(nghttp2_session *)
    ssize_t nghttp2_session_mem_recv(nghttp2_session *, const uint8_t *, size_t)
    ssize_t nghttp2_session_mem_send(nghttp2_session *, const uint8_t **)
    int nghttp2_session_want_read(nghttp2_session *)
    int nghttp2_session_want_write(nghttp2_session *)
    int nghttp2_session_consume(nghttp2_session *, int32_t, size_t)
    int nghttp2_session_consume_connection(nghttp2_session *, size_t)
    int nghttp2_session_resume_data(nghttp2_session *, int32_t)
    int nghttp2_session_terminate_session(nghttp2_session *, uint32_t)
    int nghttp2_session_set_local_window_size(nghttp2_session *, uint8_t, int32_t, int32_t)
    int32_t nghttp2_session_get_last_proc_stream_id(nghttp2_session *)
    int nghttp2_submit_settings(nghttp2_session *, uint8_t, const nghttp2_settings_entry *, size_t)
    ctypedef struct nghttp2_priority_spec:
        pass
    # An interim (1xx) response head: HEADERS without END_STREAM (RFC 9113 8.1).
    int32_t nghttp2_submit_headers(nghttp2_session *, uint8_t, int32_t, const nghttp2_priority_spec *,
                                   const nghttp2_nv *, size_t, void *)
    int nghttp2_submit_response(nghttp2_session *, int32_t, const nghttp2_nv *, size_t,
                                const nghttp2_data_provider *)
    int nghttp2_submit_rst_stream(nghttp2_session *, uint8_t, int32_t, uint32_t)
    int nghttp2_submit_goaway(nghttp2_session *, uint8_t, int32_t, uint32_t, const uint8_t *, size_t)
    const char *nghttp2_strerror(int)
    int nghttp2_session_set_stream_user_data(nghttp2_session *, int32_t, void *)
    void *nghttp2_session_get_stream_user_data(nghttp2_session *, int32_t)


# The flood limits of fastlb's server sessions, the Python path's (fastlb/http2/_nghttp2.pyx) and the
# engine's (fastlb/http/_eh2.pxi), both made by server_session() below.
cdef enum:
    H2_FIELD_OVERHEAD = 32          # RFC 9113 6.5.2: bytes counted per field on top of its name and value
    H2_DEFLATE_TABLE_SIZE = 4096    # the HPACK table the response encoder keeps
    H2_MAX_OUTBOUND_ACK = 100       # SETTINGS / PING ACKs queued for a client that does not read
    H2_MAX_SETTINGS = 32            # SETTINGS entries in one frame
    H2_MAX_CONTINUATIONS = 8        # CONTINUATION frames after a HEADERS frame (CVE-2024-27316)
    H2_RESET_BURST = 1000           # incoming RST_STREAM bucket (CVE-2023-44487), before the control budget
    H2_RESET_RATE = 33
    H2_CONTROL_REFILL_DIVISOR = 10  # the control budget refills a tenth of its burst per second


cdef inline int server_session(nghttp2_session **session, const nghttp2_session_callbacks *callbacks,
                               void *user_data, int max_concurrent_streams, Py_ssize_t max_header_list,
                               int initial_window_size, int connection_window_size,
                               nghttp2_mem *mem=NULL) noexcept:
    """A server session with fastlb's flood options and its SETTINGS queued (the limits of the config's
    h2_* fields): the engine's (fastlb/http/_eh2.pxi) and _nghttp2.Session's; mem: its allocator (NULL:
    libc's). 0, or libnghttp2's error."""
    cdef nghttp2_option *option
    cdef nghttp2_settings_entry settings[5]
    cdef int rv = nghttp2_option_new(&option)
    if rv != 0:
        return rv
    # Request bodies are acknowledged (WINDOW_UPDATE) as they are passed on (nghttp2_session_consume),
    # not as they arrive: a stream whose receiver reads slowly holds at most its window.
    nghttp2_option_set_no_auto_window_update(option, 1)
    nghttp2_option_set_max_outbound_ack(option, H2_MAX_OUTBOUND_ACK)
    nghttp2_option_set_max_settings(option, H2_MAX_SETTINGS)
    nghttp2_option_set_stream_reset_rate_limit(option, H2_RESET_BURST, H2_RESET_RATE)
    nghttp2_option_set_max_continuations(option, H2_MAX_CONTINUATIONS)
    nghttp2_option_set_max_deflate_dynamic_table_size(option, H2_DEFLATE_TABLE_SIZE)
    rv = nghttp2_session_server_new3(session, callbacks, user_data, option, mem)
    nghttp2_option_del(option)
    if rv != 0:
        return rv
    settings[0].settings_id = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
    settings[0].value = max_concurrent_streams
    settings[1].settings_id = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE
    settings[1].value = <uint32_t>max_header_list
    settings[2].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
    settings[2].value = initial_window_size
    settings[3].settings_id = NGHTTP2_SETTINGS_ENABLE_PUSH
    settings[3].value = 0
    settings[4].settings_id = NGHTTP2_SETTINGS_HEADER_TABLE_SIZE
    settings[4].value = H2_DEFLATE_TABLE_SIZE
    nghttp2_submit_settings(session[0], NGHTTP2_FLAG_NONE, settings, 5)
    if connection_window_size > 65535:
        nghttp2_session_set_local_window_size(session[0], NGHTTP2_FLAG_NONE, 0, connection_window_size)
    return 0
