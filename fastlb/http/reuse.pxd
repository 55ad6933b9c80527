# Compiled, may_reuse is a C function the HTTP engine (fastlb/http/_fast.pyx) cimports.
cpdef bint may_reuse(bint request_written_whole, bint response_read_whole, bint backend_keeps_alive,
                     bint draining) noexcept
