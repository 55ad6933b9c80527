# The admission table's C interface (fastlb/_admission.pyx): cimported by the HTTP engine
# (fastlb/http/_fast.pyx), which checks connections and requests without a call into Python.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t
from fastlb._posix cimport sockaddr

# The verdicts of admit_* (ADMIT, DENIED, TOO_MANY) and MAX_KEY_HEADERS: shared with Python.
from fastlb.constants cimport ADMIT, DENIED, TOO_MANY, MAX_KEY_HEADERS

cdef enum:
    KEY_TEXT = 38              # bytes of a key kept for display (top talkers); longer keys are cut

cdef struct Entry:
    uint64_t ident             # the key's hash (FNV-1a 64 of rule id and key: the same on every node); 0: free
    double tat                 # GCRA theoretical arrival time (CLOCK_MONOTONIC seconds)
    double last_seen
    double blocked_until       # a runtime block (API): every request 429 until then; 0: none
    uint32_t pending           # requests allowed since the last exchange with the shared store
    uint32_t allowed
    uint32_t limited
    uint16_t rule
    uint8_t dirty              # listed in Limiter.dirty
    uint8_t key_len
    char key[KEY_TEXT]

cdef struct Rule:
    double interval            # seconds per request (1 / rate)
    double tolerance           # burst * interval: how far ahead of now the arrival time may run
    int kind                   # RuleKind
    int missing                # Missing: what a request without the key falls under
    int pool                   # the pool id the rule applies to (-1: every pool)
    int slot                   # header and cookie rules: the engine's key header index (check_engine)
    const char *name           # cookie rules: the cookie's name (kept alive by Limiter.names)
    int name_len
    unsigned long long limited


cdef class Limiter:
    cdef Entry *table
    cdef uint64_t set_mask         # sets - 1 (each set: WAYS entries)
    cdef uint64_t seed             # randomises set placement (an attacker cannot aim at one set)
    cdef public Py_ssize_t capacity
    cdef Rule *rules
    cdef public int nrules
    cdef uint32_t *dirty           # entries with pending counts, for the store exchange
    cdef Py_ssize_t ndirty
    # CIDR lists: sorted, merged [start, end] ranges of 128-bit addresses (IPv4 as ::ffff:a.b.c.d),
    # each as (hi, lo) halves: 4 uint64 per range.
    cdef uint64_t *deny
    cdef Py_ssize_t ndeny
    cdef uint64_t *allow
    cdef Py_ssize_t nallow
    cdef bint allow_only           # an allow list is set: everything else is denied
    cdef public Py_ssize_t max_conn_per_source
    cdef dict conns                # client address text -> open connections (only while > 0)
    cdef public unsigned long long denied, too_many, evictions
    cdef public bint has_request_rules
    cdef list pool_names           # pool id -> name (bytes): the key of `route` rules
    cdef list names                # the rules' cookie names (bytes), which Rule.name points into

    cdef bint listed_out(self, uint64_t hi, uint64_t lo)
    cdef int count_in(self, const char *ip, Py_ssize_t ip_len)
    cdef int admit_address(self, const sockaddr *address, const char *ip, Py_ssize_t ip_len)
    cdef void leave(self, const char *ip, Py_ssize_t ip_len)
    cdef double check(self, int rule, const char *key, Py_ssize_t key_len, double now)
    cdef double check_engine(self, int pool, const char *ip, Py_ssize_t ip_len, const char *buf,
                             const uint32_t *key_start, const int32_t *key_len, double now)
    cdef Entry *find(self, uint64_t ident, bint insert, double now)


# A cookie's value in a Cookie header, as fastlb/http/routing.py's cookie_value finds it (also the
# HTTP engine's cookie:NAME hashing key).
cdef bint cookie_value(const char *h, Py_ssize_t n, const char *name, Py_ssize_t name_len,
                       const char **value, Py_ssize_t *value_len) noexcept nogil
