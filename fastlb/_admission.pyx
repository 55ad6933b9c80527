# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Admission control's table (fastlb/admission.py is its Python side): keyed rate limits, per-source
connection counts and CIDR allow/deny lists, in C, so the HTTP engine decides without Python.

Rate limits are GCRA (the token bucket as one number per key: the theoretical arrival time `tat`): a
request at `now` is allowed when max(tat, now) + interval - now <= burst * interval, and then moves tat
by one interval. So `burst` requests pass at once and then `rate` per second, and a key's whole state
is 8 bytes that another node can add its own consumption to (fastlb/admission.py's store exchange).

Memory is bounded: a fixed table of `capacity` entries (88 bytes each), WAYS-way set associative. A new
key takes a free entry of its set, else evicts the least recently seen one that carries no state (its
bucket full again), else the least recently seen one (keys under attack push out each other, not a key
that is being limited, unless the attacker's keys flood its set faster than it sends). Runtime blocks
are never evicted. Set placement is seeded at random per process: keys cannot be aimed at one set.

CIDR lists are sorted, merged ranges of 128-bit addresses (IPv4 mapped into ::ffff:0:0/96), looked up by
binary search: O(log n) per connection whatever the list's size.
"""
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset, memcmp
from libc.stdint cimport uint8_t, uint16_t, uint32_t, int32_t, uint64_t
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from fastlb._posix cimport *
import os

cdef enum:
    WAYS = 8

# What a rule keys on (RATE_KEY_*) and what a request without its key falls under (MISSING_*), named for
# Python too (fastlb/config/admission.py KINDS and MISSING).
from fastlb.constants cimport (RATE_KEY_SOURCE, RATE_KEY_ROUTE, RATE_KEY_HEADER, RATE_KEY_COOKIE, MISSING_SOURCE,
                              MISSING_SHARED)

cdef double EPSILON = 1e-9
cdef uint64_t FNV_OFFSET = 14695981039346656037ULL
cdef uint64_t FNV_PRIME = 1099511628211ULL


cdef inline double monotonic_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline uint64_t key_ident(int rule, const char *key, Py_ssize_t n) noexcept nogil:
    """FNV-1a 64 over the rule index and the key: the same on every node (the store's key)."""
    cdef uint64_t h = FNV_OFFSET ^ <uint64_t>(rule + 1)
    cdef Py_ssize_t i
    h *= FNV_PRIME
    for i in range(n):
        h = (h ^ <uint8_t>key[i]) * FNV_PRIME
    return h if h else 1


cdef inline uint64_t mix(uint64_t h) noexcept nogil:
    """murmur3's finaliser: every bit of the seeded ident moves the set index."""
    h ^= h >> 33
    h *= 0xff51afd7ed558ccdULL
    h ^= h >> 33
    h *= 0xc4ceb9fe1a85ec53ULL
    h ^= h >> 33
    return h


cdef inline bint parse_ip(const char *text, uint64_t *hi, uint64_t *lo) noexcept:
    """Address text -> 128 bits (IPv4 mapped); False when it is not an address."""
    cdef unsigned char raw[16]
    cdef int i
    if inet_pton(AF_INET, text, raw + 12) == 1:
        memset(raw, 0, 10)
        raw[10] = 0xff
        raw[11] = 0xff
    elif inet_pton(AF_INET6, text, raw) != 1:
        return False
    hi[0] = lo[0] = 0
    for i in range(8):
        hi[0] = (hi[0] << 8) | raw[i]
        lo[0] = (lo[0] << 8) | raw[i + 8]
    return True


cdef inline bint sockaddr_ip(const sockaddr *address, uint64_t *hi, uint64_t *lo) noexcept:
    cdef const unsigned char *raw
    cdef int i
    hi[0] = lo[0] = 0
    if address.sa_family == AF_INET:
        raw = <const unsigned char *>&(<sockaddr_in *>address).sin_addr
        hi[0] = 0
        lo[0] = (<uint64_t>0xffff << 32) | (<uint64_t>raw[0] << 24) | (<uint64_t>raw[1] << 16) \
            | (<uint64_t>raw[2] << 8) | raw[3]
        return True
    if address.sa_family == AF_INET6:
        raw = (<sockaddr_in6 *>address).sin6_addr.s6_addr
        for i in range(8):
            hi[0] = (hi[0] << 8) | raw[i]
            lo[0] = (lo[0] << 8) | raw[i + 8]
        return True
    return False


cdef inline bint in_ranges(const uint64_t *ranges, Py_ssize_t n, uint64_t hi, uint64_t lo) noexcept:
    """Binary search over sorted, disjoint [start, end] ranges."""
    cdef Py_ssize_t low = 0, high = n - 1, mid
    cdef const uint64_t *r
    while low <= high:
        mid = (low + high) >> 1
        r = ranges + 4 * mid
        if hi < r[0] or (hi == r[0] and lo < r[1]):
            high = mid - 1
        elif hi > r[2] or (hi == r[2] and lo > r[3]):
            low = mid + 1
        else:
            return True
    return False


cdef inline bint is_space(char c) noexcept nogil:
    return c == 32 or 9 <= c <= 13             # bytes.strip()'s whitespace


cdef bint cookie_value(const char *h, Py_ssize_t n, const char *name, Py_ssize_t name_len,
                       const char **value, Py_ssize_t *value_len) noexcept nogil:
    """Cookie `name`'s value in a Cookie header, as fastlb/http/routing.py's cookie_value finds it (the
    Python path's key must be the same bytes): the first `;`-separated pair, stripped, whose part before
    its first `=` is the name; the value without surrounding quotes. False: absent (or empty)."""
    cdef Py_ssize_t i = 0, j, a, b, e
    while i <= n:
        j = i
        while j < n and h[j] != 59:                # ';'
            j += 1
        a, b = i, j
        while a < b and is_space(h[a]):
            a += 1
        while b > a and is_space(h[b - 1]):
            b -= 1
        e = a
        while e < b and h[e] != 61:                # '='
            e += 1
        if e < b and e - a == name_len and memcmp(h + a, name, name_len) == 0:
            a = e + 1
            while a < b and h[a] == 34:            # '"'
                a += 1
            while b > a and h[b - 1] == 34:
                b -= 1
            value[0] = h + a
            value_len[0] = b - a
            return b > a
        i = j + 1
    return False


cdef uint64_t *pack_ranges(list ranges) except? NULL:
    """[(start, end)] of Python ints (sorted, disjoint) -> the C array (NULL when empty)."""
    cdef Py_ssize_t n = len(ranges), i
    cdef uint64_t *out
    if n == 0:
        return NULL
    out = <uint64_t *>malloc(sizeof(uint64_t) * 4 * n)
    if out == NULL:
        raise MemoryError()
    mask = (1 << 64) - 1
    for i in range(n):
        start, end = ranges[i]
        out[4 * i] = start >> 64
        out[4 * i + 1] = start & mask
        out[4 * i + 2] = end >> 64
        out[4 * i + 3] = end & mask
    return out


cdef class Limiter:
    """One worker's table. rules: [(interval, tolerance, kind, missing, pool_id, header slot, cookie
    name)] in config order (the slot: header and cookie rules' index into the engine's key headers, else
    -1; the name: cookie rules' cookie, else b""); pool_names: pool id -> name (bytes)."""

    def __cinit__(self):
        self.table = NULL
        self.rules = NULL
        self.dirty = NULL
        self.deny = NULL
        self.allow = NULL

    def __init__(self, Py_ssize_t capacity, list rules, list pool_names, Py_ssize_t max_conn_per_source):
        cdef Py_ssize_t sets = 1
        cdef int i
        while sets * WAYS < capacity:
            sets <<= 1
        self.capacity = sets * WAYS
        self.set_mask = sets - 1
        self.seed = int.from_bytes(os.urandom(8), "little")
        self.table = <Entry *>calloc(self.capacity, sizeof(Entry))
        self.dirty = <uint32_t *>malloc(sizeof(uint32_t) * self.capacity)
        self.rules = <Rule *>calloc(len(rules) + 1, sizeof(Rule))
        if self.table == NULL or self.dirty == NULL or self.rules == NULL:
            raise MemoryError()
        self.nrules = len(rules)
        self.has_request_rules = self.nrules > 0
        self.names = [bytes(rule[6]) for rule in rules]
        for i in range(self.nrules):
            interval, tolerance, kind, missing, pool, slot, _ = rules[i]
            self.rules[i].name = PyBytes_AS_STRING(self.names[i])
            self.rules[i].name_len = len(self.names[i])
            self.rules[i].interval = interval
            self.rules[i].tolerance = tolerance
            self.rules[i].kind = kind
            self.rules[i].missing = missing
            self.rules[i].pool = pool
            self.rules[i].slot = slot
            self.rules[i].limited = 0
        self.pool_names = list(pool_names)
        self.max_conn_per_source = max_conn_per_source
        self.conns = {}

    def __dealloc__(self):
        free(self.table)
        free(self.dirty)
        free(self.rules)
        free(self.deny)
        free(self.allow)

    # ---- CIDR lists and connections per source -----------------------------------------------------

    def set_lists(self, list deny, list allow, bint allow_only):
        """Replaces the lists: [(start, end)] sorted, disjoint 128-bit ranges (fastlb/admission.py)."""
        cdef uint64_t *new_deny = pack_ranges(deny)
        cdef uint64_t *new_allow
        try:
            new_allow = pack_ranges(allow)
        except MemoryError:
            free(new_deny)
            raise
        free(self.deny)
        free(self.allow)
        self.deny, self.ndeny = new_deny, len(deny)
        self.allow, self.nallow = new_allow, len(allow)
        self.allow_only = allow_only

    cdef bint listed_out(self, uint64_t hi, uint64_t lo):
        if self.ndeny and in_ranges(self.deny, self.ndeny, hi, lo):
            return True
        return self.allow_only and not in_ranges(self.allow, self.nallow, hi, lo)

    cdef int count_in(self, const char *ip, Py_ssize_t ip_len):
        cdef object key
        cdef object count
        if self.max_conn_per_source <= 0:
            return ADMIT
        key = PyBytes_FromStringAndSize(ip, ip_len)
        count = self.conns.get(key)
        if count is None:
            self.conns[key] = 1
            return ADMIT
        if <Py_ssize_t>count >= self.max_conn_per_source:
            self.too_many += 1
            return TOO_MANY
        self.conns[key] = count + 1
        return ADMIT

    cdef int admit_address(self, const sockaddr *address, const char *ip, Py_ssize_t ip_len):
        """A new connection (the engine's accept): ADMIT (counted: leave() when it closes), DENIED or
        TOO_MANY (not counted)."""
        cdef uint64_t hi, lo
        if (self.ndeny or self.allow_only) and sockaddr_ip(address, &hi, &lo) and self.listed_out(hi, lo):
            self.denied += 1
            return DENIED
        return self.count_in(ip, ip_len)

    def admit(self, bytes ip):
        """The same for an address as text (the Python paths)."""
        cdef uint64_t hi, lo
        if (self.ndeny or self.allow_only) and parse_ip(ip, &hi, &lo) and self.listed_out(hi, lo):
            self.denied += 1
            return DENIED
        return self.count_in(ip, len(ip))

    def listed(self, bytes ip):
        """Whether the lists refuse this address (nothing counted)."""
        cdef uint64_t hi, lo
        return bool(parse_ip(ip, &hi, &lo) and self.listed_out(hi, lo))

    cdef void leave(self, const char *ip, Py_ssize_t ip_len):
        cdef object key
        cdef object count
        if self.max_conn_per_source <= 0:
            return
        key = PyBytes_FromStringAndSize(ip, ip_len)
        count = self.conns.get(key)
        if count is None:
            return
        if count <= 1:
            del self.conns[key]
        else:
            self.conns[key] = count - 1

    def leave_ip(self, bytes ip):
        self.leave(ip, len(ip))

    def connections_of(self, bytes ip):
        return self.conns.get(ip, 0)

    # ---- rate limits -------------------------------------------------------------------------------

    cdef Entry *find(self, uint64_t ident, bint insert, double now):
        """The key's entry; with insert, a new one when absent (NULL only when its whole set is blocked)."""
        cdef Entry *ways = self.table + (mix(ident ^ self.seed) & self.set_mask) * WAYS
        cdef Entry *victim = NULL
        cdef Entry *e
        cdef int i
        cdef bint victim_idle = False, idle
        for i in range(WAYS):
            e = ways + i
            if e.ident == ident:
                return e
        if not insert:
            return NULL
        for i in range(WAYS):
            e = ways + i
            if e.ident == 0:
                victim = e
                break
            if e.blocked_until > now:
                continue
            idle = e.tat <= now
            if victim == NULL or (idle and not victim_idle) or (
                    idle == victim_idle and e.last_seen < victim.last_seen):
                victim = e
                victim_idle = idle
        if victim == NULL:
            return NULL
        if victim.ident != 0:
            self.evictions += 1
        victim.ident = ident
        victim.tat = 0.0
        victim.blocked_until = 0.0
        victim.pending = victim.allowed = victim.limited = 0
        victim.key_len = 0
        victim.last_seen = now
        return victim

    cdef double check(self, int r, const char *key, Py_ssize_t key_len, double now):
        """One request under rule r with this key: 0.0 allowed, else the seconds until one would be."""
        cdef Rule *rule = self.rules + r
        cdef Entry *e = self.find(key_ident(r, key, key_len), True, now)
        cdef double tat
        if e == NULL:
            return 0.0
        if e.key_len == 0:
            e.rule = <uint16_t>r
            e.key_len = <uint8_t>min(key_len, KEY_TEXT)
            memcpy(e.key, key, e.key_len)
        e.last_seen = now
        if e.blocked_until > now:
            e.limited += 1
            rule.limited += 1
            return e.blocked_until - now
        tat = e.tat if e.tat > now else now
        tat += rule.interval
        if tat - now > rule.tolerance + EPSILON:
            e.limited += 1
            rule.limited += 1
            return tat - now - rule.tolerance
        e.tat = tat
        e.allowed += 1
        e.pending += 1
        if not e.dirty:
            e.dirty = 1
            self.dirty[self.ndirty] = <uint32_t>(e - self.table)
            self.ndirty += 1
        return 0.0

    cdef double check_engine(self, int pool, const char *ip, Py_ssize_t ip_len, const char *buf,
                             const uint32_t *key_start, const int32_t *key_len, double now):
        """Every rule of `pool`, for the engine: source, route, header and cookie keys (a key header's
        value is buf[key_start[slot]:+key_len[slot]], key_len -1 when absent). The engine serves no
        balancer with query rules (fastlb/http/fast.py)."""
        cdef int r, slot
        cdef const char *value
        cdef Py_ssize_t value_len
        cdef double wait
        cdef bytes name
        cdef Rule *rule
        for r in range(self.nrules):
            rule = self.rules + r
            if rule.pool >= 0 and rule.pool != pool:
                continue
            if rule.kind == RATE_KEY_SOURCE:
                wait = self.check(r, ip, ip_len, now)
            elif rule.kind == RATE_KEY_ROUTE:
                name = self.pool_names[pool]
                wait = self.check(r, PyBytes_AS_STRING(name), len(name), now)
            elif rule.kind == RATE_KEY_HEADER or rule.kind == RATE_KEY_COOKIE:
                slot = rule.slot
                if key_len[slot] >= 0 and rule.kind == RATE_KEY_HEADER:
                    wait = self.check(r, buf + key_start[slot], key_len[slot], now)
                elif key_len[slot] >= 0 and cookie_value(buf + key_start[slot], key_len[slot], rule.name,
                                                         rule.name_len, &value, &value_len):
                    wait = self.check(r, value, value_len, now)
                elif rule.missing == MISSING_SOURCE:
                    wait = self.check(r, ip, ip_len, now)
                elif rule.missing == MISSING_SHARED:
                    wait = self.check(r, b"-", 1, now)
                else:
                    continue
            else:
                continue
            if wait > 0.0:
                return wait
        return 0.0

    def check_key(self, int rule, bytes key, double now=-1.0):
        """The Python path's check (fastlb/admission.py computes the key); `now` for tests (default: the
        monotonic clock, as the engine's)."""
        return self.check(rule, key, len(key), now if now >= 0.0 else monotonic_now())

    # ---- the shared store's exchange ---------------------------------------------------------------

    def take_pending(self, Py_ssize_t limit):
        """Up to `limit` entries with requests allowed since the last exchange: [(ident, rule, count)],
        their counts reset (what is allowed from now on goes into the next exchange)."""
        cdef list out = []
        cdef Entry *e
        cdef Py_ssize_t i = self.ndirty, n = 0
        while i > 0 and n < limit:
            i -= 1
            e = self.table + self.dirty[i]
            e.dirty = 0
            if e.pending and e.ident:
                out.append((e.ident, e.rule, e.pending))
                e.pending = 0
            n += 1
        self.ndirty = i
        return out

    def apply_shared(self, uint64_t ident, double ahead, double sent_at):
        """The store's answer for a key: its arrival time was `ahead` seconds past the store's clock when
        the exchange sent at `sent_at` (monotonic) reached it; requests allowed here since go on top."""
        cdef Entry *e = self.find(ident, False, 0.0)
        if e == NULL:
            return
        e.tat = sent_at + ahead + e.pending * self.rules[e.rule].interval

    def cookie_key(self, bytes header, bytes name):
        """The C cookie parser on its own (tests compare it with the Python path's)."""
        cdef const char *value
        cdef Py_ssize_t value_len
        if cookie_value(header, len(header), name, len(name), &value, &value_len):
            return PyBytes_FromStringAndSize(value, value_len)
        return None

    def interval_of(self, int rule):
        return self.rules[rule].interval

    def now(self):
        return monotonic_now()

    # ---- runtime blocks, views ---------------------------------------------------------------------

    def block(self, int rule, bytes key, double seconds):
        """Every request with this key under this rule gets 429 for `seconds` (inf: until unblocked).
        False when the key's set holds only blocked keys."""
        cdef double now = monotonic_now()
        cdef Entry *e
        if not 0 <= rule < self.nrules:
            return False
        e = self.find(key_ident(rule, key, len(key)), True, now)
        if e == NULL:
            return False
        e.rule = <uint16_t>rule
        e.key_len = <uint8_t>min(len(key), KEY_TEXT)
        memcpy(e.key, PyBytes_AS_STRING(key), e.key_len)
        e.blocked_until = now + seconds
        return True

    def unblock(self, int rule, bytes key):
        cdef Entry *e = self.find(key_ident(rule, key, len(key)), False, 0.0)
        if e == NULL or e.blocked_until == 0.0:
            return False
        e.blocked_until = 0.0
        return True

    def entries(self, double seen_within, double now=-1.0):
        """[(rule, key, allowed, limited, blocked)] of the keys seen within the last seen_within seconds
        (or blocked): the views' raw material (top talkers, top limited). O(capacity): at scrape time."""
        cdef double since
        cdef Py_ssize_t i
        cdef Entry *e
        cdef list out = []
        if now < 0.0:
            now = monotonic_now()
        since = now - seen_within
        for i in range(self.capacity):
            e = self.table + i
            if e.ident and (e.last_seen >= since or e.blocked_until > now):
                out.append((e.rule, PyBytes_FromStringAndSize(e.key, e.key_len), e.allowed, e.limited,
                            e.blocked_until > now))
        return out

    def rule_limited(self):
        return [self.rules[i].limited for i in range(self.nrules)]

    def used(self):
        cdef Py_ssize_t i, n = 0
        for i in range(self.capacity):
            n += self.table[i].ident != 0
        return n
