# cython: language_level=3
"""The per-chunk data path of the L4 relay, compiled.

uvloop calls a protocol's data_received through a bound method; a compiled method
runs without a Python frame, and the peer's write is looked up once per connection,
not once per chunk. Everything that is not per chunk stays in fastlb/l4.py, whose
protocols inherit these methods.
"""
cimport cython


cdef class RelayEnd:
    """One side of a relayed connection: what it receives goes to `peer`."""

    cdef public object peer          # the other side's transport, once connected
    cdef public object peer_write    # peer.write, bound once
    cdef public bint active          # set per chunk, cleared by the idle-timeout sweep
    cdef public unsigned long long received   # bytes this side read (what the event loop relayed)

    def set_peer(self, transport):
        self.peer = transport
        self.peer_write = None if transport is None else transport.write

    def data_received(self, data):
        self.peer_write(data)
        self.active = True
        self.received += len(data)

    def pause_writing(self):
        # Our transport's buffer is full: stop reading the peer until it drains.
        self.peer.pause_reading()

    def resume_writing(self):
        self.peer.resume_reading()
