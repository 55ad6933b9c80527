# Compiled, may_reuse and may_send_again_on are C functions the HTTP engine (fastlb/http/_fast.pyx) cimports.
cpdef bint may_reuse(bint request_written_whole, bint response_read_whole, bint backend_keeps_alive,
                     bint draining) noexcept
cpdef bint may_send_again_on(bint response_started, bint replayable, bint idempotent, bint written,
                             Py_ssize_t attempts_used, Py_ssize_t attempts) noexcept
