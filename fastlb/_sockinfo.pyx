# cython: language_level=3
"""What the kernel counted for a TCP socket, for the per-connection accounting (fastlb/observe.py).

Compiled because the alternatives cost more than the whole rest of the accounting: uvloop's
PseudoSocket.getsockopt ~7.5 us a call (it builds a socket object), ctypes ~3 us; this ~1 us, most of
it the syscall. Not in the balancer core, which does no system calls.
"""
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef extern from "sys/socket.h":
    ctypedef uint32_t socklen_t
    int getsockopt(int fd, int level, int name, void *value, socklen_t *length) nogil

cdef extern from "netinet/in.h":
    int IPPROTO_TCP

cdef extern from "netinet/tcp.h":
    int TCP_INFO

# struct tcp_info: tcpi_bytes_acked and tcpi_bytes_received, two u64 at byte 120 (Linux >= 4.2).
DEF BYTES_OFFSET = 120
DEF INFO_LENGTH = 144


def tcp_bytes(int fd):
    """(bytes acked by the peer, bytes received from it), or None when the fd is no TCP socket."""
    cdef uint8_t info[INFO_LENGTH]
    cdef socklen_t length = INFO_LENGTH
    cdef uint64_t acked, received
    if getsockopt(fd, IPPROTO_TCP, TCP_INFO, info, &length) != 0 or length < BYTES_OFFSET + 16:
        return None
    memcpy(&acked, info + BYTES_OFFSET, 8)
    memcpy(&received, info + BYTES_OFFSET + 8, 8)
    return (acked, received)
