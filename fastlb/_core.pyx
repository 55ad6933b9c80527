# cython: language_level=3
"""fastlb's compiled balancer core: backend selection and accounting, no I/O.

The core knows backends by integer index and keeps their state in C arrays. The event
loop calls it a few times per connection or request:

    i = b.pick(key, avoid)            choose a backend (-1: none available)
    b.on_connect(i) ... b.on_close(i) in-flight accounting
    b.on_response(i, seconds, ok)     latency (EWMA) and failure feed

and, rarely, set_weight / set_state / add / remove. fastlb/core_py.py is a pure-Python
twin with the same API that makes the same picks (tests compare them pick for pick).

Algorithms and their cost per pick (n backends, P ring points, M table slots):
    roundrobin  smooth weighted round robin as earliest-deadline-first: each backend's
                next turn is at last + 1/weight, so picks interleave (weights 5,1,1 give
                a b a a a c a, never a burst of five). One FIFO per weight plus a heap
                of weight classes: O(1) pick with equal weights, O(log distinct
                weights) otherwise; changes O(log 256).
    random      weighted random: a weight class (powers of two) by its share, then a
                member by rejection (accepted >= 1/2 of the time): O(1) pick and change.
    leastconn   lowest (in-flight + 1) / weight; a load change requeues a backend
                behind those of equal load (HAProxy's fwlc). Heap: O(1) pick,
                O(log n) connect, close and change. Call on_connect right after
                pick: a pick alone changes no load.
    leasttime   lowest (EWMA latency + 1 us) x (in-flight + 1) / weight, ties to the
                longest queued. A backend not picked for max(1000, 2n) picks (a once
                slow one) is probed, at most every 50th pick: its EWMA drops to the
                best backend's and its next samples decide. Heap + LRU list: O(1)
                pick, O(log n) connect, close and response.
    p2c         power of two random choices on (in-flight + 1) / weight: O(1).
    first       the lowest-index available backend. Heap: O(1) pick, O(log n) change.
    hash        map-based: xxh3(key) mod total weight over the available backends
                (HAProxy's map-based hashing, without its table): Fenwick, O(log n).
                Any change remaps keys; use ketama or maglev to keep them stable.
    ketama      nginx-compatible consistent ring (160 points per weight unit, crc32 of
                host\\0port chained with the previous point): O(log P) pick; state
                changes O(1) (down backends are skipped on the ring); weight changes,
                add and remove rebuild the ring in O(P).
    maglev      Maglev lookup table (prime size, xxh3 permutations, weighted): O(1)
                pick; state changes O(1) (down backends are skipped); weight changes,
                add and remove rebuild the table in O(M log M).
hash, ketama and maglev accept bounded_load=c (>= 1): a backend already holding more
than ceil(c x (in-flight + 1) x weight / total weight) requests is passed over for
the next one in the key's preference order ("consistent hashing with bounded loads").
Request keys are hashed with xxh3-64; hash_key() exposes it.
"""
cimport cython
from libc.math cimport ceil
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

import os

from fastlb.core_shared import (
    ALGORITHMS, STATE_NAMES, check_addr, check_arguments, check_weight, initial_phases,
    is_prime, ketama_host_port, maglev_table_size,
)

cdef extern from "xxhash.h" nogil:
    uint64_t XXH3_64bits(const void* data, size_t length)
    uint64_t XXH3_64bits_withSeed(const void* data, size_t length, uint64_t seed)

include "core/consts.pxi"
include "core/random.pxi"
include "core/heap.pxi"
include "core/links.pxi"
include "core/fenwick.pxi"
include "core/ketama.pxi"
include "core/maglev.pxi"

crc32_init_table()


def hash_key(key):
    """The 64-bit xxh3 hash fastlb uses for every request key."""
    cdef bytes raw = _as_bytes(key)
    return XXH3_64bits(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))


cdef inline bytes _as_bytes(object key):
    if type(key) is bytes:
        return <bytes>key
    if isinstance(key, str):
        return (<str>key).encode()
    return bytes(key)


@cython.final
cdef class Balancer:
    """Backend selection and accounting; backends are known by index.

    Balancer(addrs, algorithm="roundrobin", weights=None, *, bounded_load=0.0,
             seed=None, table_size=0)

    pick(key=None, avoid=-1) -> index, or -1 when no backend is available.
    candidates(key=None, n=2) -> up to n distinct indexes in preference order; it
        counts as one pick of the first.
    on_connect(i) / on_close(i); on_response(i, seconds, ok=True)
    set_weight(i, w) (0..256, 0: never picked); set_state(i, "up"|"down"|"drain")
    add(addr, weight=1) -> index (indexes are never reused); remove(i)
    stats(i) -> dict; len(b); b.available; b.total_inflight
    """

    cdef readonly str algorithm
    cdef readonly double bounded_load
    cdef int algo
    cdef Py_ssize_t n, cap
    cdef list addrs
    cdef list ketama_bases           # crc32 state of "host\0port" per backend, or None
    # per-backend columns
    cdef int32_t* weight
    cdef unsigned char* state
    cdef int64_t* inflight
    cdef uint64_t* picks
    cdef uint64_t* failures
    cdef uint64_t* consecutive
    cdef double* ewma
    cdef int32_t* eligible_pos
    cdef Links links                 # leasttime's LRU list or roundrobin's class FIFOs
    cdef double* rr_deadline         # roundrobin: each backend's next turn
    cdef uint64_t* rr_order
    cdef uint64_t* touched_at
    # structures
    cdef int32_t* eligible          # dense list of eligible backends (p2c draws from it)
    cdef Py_ssize_t n_eligible
    cdef int32_t* class_members[WEIGHT_CLASSES]   # random: eligible backends by weight class
    cdef Py_ssize_t class_size[WEIGHT_CLASSES]
    cdef int64_t class_weight[WEIGHT_CLASSES]
    cdef int32_t* class_pos
    cdef Heap heap                   # leastconn, leasttime, first: the backends
    cdef Heap rr_classes             # roundrobin: weight classes by their head's turn
    cdef int32_t rr_head[MAX_WEIGHT + 1]
    cdef int32_t rr_tail[MAX_WEIGHT + 1]
    cdef Fenwick fenwick
    cdef int32_t lru_head, lru_tail  # leasttime: least recently picked first
    cdef Ring ring
    cdef int32_t* table
    cdef Py_ssize_t table_size
    # counters
    cdef uint64_t rng, seq, clock
    cdef double vtime
    cdef double join_phase           # roundrobin: where a joiner starts in its first turn
    cdef int64_t total_inflight_count

    def __cinit__(self):
        self.cap = 0
        self.n = 0

    def __init__(self, addrs, algorithm="roundrobin", weights=None, *,
                 double bounded_load=0.0, seed=None, Py_ssize_t table_size=0):
        addrs, weights = check_arguments(addrs, algorithm, weights, bounded_load)
        self.algorithm = algorithm
        self.algo = ALGORITHMS.index(algorithm)
        self.bounded_load = bounded_load
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self.rng = seed & 0xFFFFFFFFFFFFFFFF
        self.table_size = table_size or maglev_table_size(len(addrs))
        if not is_prime(self.table_size):
            raise ValueError(f"table_size must be a prime, not {self.table_size}")
        self.addrs = []
        self.ketama_bases = []
        self.lru_head = self.lru_tail = -1
        for w in range(MAX_WEIGHT + 1):
            self.rr_head[w] = self.rr_tail[w] = -1
        self.rr_classes.items = <HeapEntry*>_resize(NULL, MAX_WEIGHT + 1, sizeof(HeapEntry))
        self.rr_classes.pos = <int32_t*>_resize(NULL, MAX_WEIGHT + 1, sizeof(int32_t))
        for w in range(MAX_WEIGHT + 1):
            self.rr_classes.pos[w] = -1
        self._grow(max(8, len(addrs)))
        for addr, weight, phase in zip(addrs, weights, initial_phases(weights)):
            self.join_phase = phase
            self._append(addr, weight)
        self.join_phase = 0.5
        self._rebuild()

    def __dealloc__(self):
        cdef int c
        free(self.weight); free(self.state); free(self.inflight); free(self.picks)
        free(self.failures); free(self.consecutive); free(self.ewma)
        free(self.eligible_pos); free(self.links.prev); free(self.links.next)
        free(self.rr_deadline); free(self.rr_order)
        free(self.rr_classes.items); free(self.rr_classes.pos)
        free(self.touched_at); free(self.eligible); free(self.heap.items); free(self.heap.pos)
        free(self.fenwick.tree); free(self.ring.hashes); free(self.ring.servers); free(self.ring.index); free(self.table)
        free(self.class_pos)
        for c in range(WEIGHT_CLASSES):
            free(self.class_members[c])

    # ---- public API -------------------------------------------------------------

    def __len__(self):
        return self.n

    @property
    def available(self):
        return self.n_eligible

    @property
    def total_inflight(self):
        return self.total_inflight_count

    def pick(self, key=None, int avoid=-1):
        """Index of the chosen backend, or -1; avoid: one not to return if another can serve."""
        cdef int32_t chosen
        cdef uint64_t h = 0
        if self.n_eligible == 0:
            return -1
        if avoid >= self.n or (avoid >= 0 and (self.n_eligible == 1 or not self._is_eligible(avoid))):
            avoid = -1
        if self.algo >= ALGO_HASH:
            h = self._key_hash(key)
        chosen = self._choose(h, avoid)
        self.picks[chosen] += 1
        return chosen

    def candidates(self, key=None, Py_ssize_t n=2):
        """Up to n distinct backends in preference order; counts as one pick of the first."""
        cdef uint64_t h = 0
        cdef int32_t first, i
        cdef Py_ssize_t k
        cdef list chosen
        if self.n_eligible == 0 or n < 1:
            return []
        if self.algo >= ALGO_HASH:
            h = self._key_hash(key)
        first = self._choose(h, -1)
        self.picks[first] += 1
        chosen = [first]
        if n == 1:
            return chosen
        if self.algo == ALGO_ROUNDROBIN:
            self._rr_next(chosen, n)
        elif self.algo == ALGO_LEASTCONN or self.algo == ALGO_LEASTTIME or self.algo == ALGO_FIRST:
            self._heap_next(chosen, n)
        elif self.algo == ALGO_RANDOM or self.algo == ALGO_P2C:
            self._draws_next(chosen, n)
        else:
            self._walk_next(chosen, n, h)
        return chosen

    def on_connect(self, Py_ssize_t i):
        self._check_index(i)
        self.inflight[i] += 1
        self.total_inflight_count += 1
        self._rekey(<int32_t>i)

    def on_close(self, Py_ssize_t i):
        self._check_index(i)
        if self.inflight[i] > 0:
            self.inflight[i] -= 1
            self.total_inflight_count -= 1
            self._rekey(<int32_t>i)

    def on_response(self, Py_ssize_t i, double seconds, bint ok=True):
        self._check_index(i)
        if seconds < 0.0:
            seconds = 0.0
        cdef double ewma = self.ewma[i]
        self.ewma[i] = seconds if ewma <= 0.0 else ewma + EWMA_ALPHA * (seconds - ewma)
        if ok:
            self.consecutive[i] = 0
        else:
            self.failures[i] += 1
            self.consecutive[i] += 1
        self._rekey(<int32_t>i)

    def set_weight(self, Py_ssize_t i, weight):
        self._check_index(i)
        cdef int32_t new = check_weight(weight)
        cdef int32_t old = self.weight[i]
        if new == old:
            return
        cdef bint was = self._is_eligible(i)
        self.weight[i] = new
        if was:
            self._leave(<int32_t>i, old)
        self._eligibility_changed(<int32_t>i, was, was and self._is_eligible(i))
        if self.algo == ALGO_KETAMA or self.algo == ALGO_MAGLEV:
            self._rebuild()

    def set_state(self, Py_ssize_t i, str state):
        self._check_index(i)
        if state not in ("up", "drain", "down"):
            raise ValueError(f"state must be 'up', 'down' or 'drain', not {state!r}")
        cdef unsigned char code = STATE_NAMES.index(state)
        if code == self.state[i]:
            return
        cdef bint was = self._is_eligible(i)
        self.state[i] = code
        if was:
            self._leave(<int32_t>i, self.weight[i])
        self._eligibility_changed(<int32_t>i, was, False)

    def add(self, addr, weight=1):
        cdef int32_t i = self._append(addr, weight)
        if self.algo == ALGO_KETAMA:
            # The newest index: its points merge into the ring as a rebuild would place them.
            ring_add_server(&self.ring, self.ketama_bases[i], KETAMA_POINTS_PER_WEIGHT * self.weight[i], i)
        else:
            self._rebuild()
        return i

    def remove(self, Py_ssize_t i):
        self._check_index(i)
        cdef bint was = self._is_eligible(i)
        self.state[i] = STATE_REMOVED
        if was:
            self._leave(<int32_t>i, self.weight[i])
        self.total_inflight_count -= self.inflight[i]
        self.inflight[i] = 0
        self._eligibility_changed(<int32_t>i, was, False)
        self._rebuild()

    def stats(self, Py_ssize_t i):
        if not 0 <= i < self.n:
            raise IndexError(f"no backend {i}")
        return {
            "addr": self.addrs[i],
            "weight": self.weight[i],
            "state": STATE_NAMES[self.state[i]],
            "inflight": self.inflight[i],
            "picks": self.picks[i],
            "failures": self.failures[i],
            "consecutive_failures": self.consecutive[i],
            "ewma": self.ewma[i],
        }

    # ---- membership -------------------------------------------------------------

    cdef int _grow(self, Py_ssize_t cap) except -1:
        cdef Py_ssize_t i
        cdef int c
        self.weight = <int32_t*>_resize(self.weight, cap, sizeof(int32_t))
        self.state = <unsigned char*>_resize(self.state, cap, 1)
        self.inflight = <int64_t*>_resize(self.inflight, cap, sizeof(int64_t))
        self.picks = <uint64_t*>_resize(self.picks, cap, sizeof(uint64_t))
        self.failures = <uint64_t*>_resize(self.failures, cap, sizeof(uint64_t))
        self.consecutive = <uint64_t*>_resize(self.consecutive, cap, sizeof(uint64_t))
        self.ewma = <double*>_resize(self.ewma, cap, sizeof(double))
        self.eligible_pos = <int32_t*>_resize(self.eligible_pos, cap, sizeof(int32_t))
        self.links.prev = <int32_t*>_resize(self.links.prev, cap, sizeof(int32_t))
        self.links.next = <int32_t*>_resize(self.links.next, cap, sizeof(int32_t))
        self.rr_deadline = <double*>_resize(self.rr_deadline, cap, sizeof(double))
        self.rr_order = <uint64_t*>_resize(self.rr_order, cap, sizeof(uint64_t))
        self.touched_at = <uint64_t*>_resize(self.touched_at, cap, sizeof(uint64_t))
        self.eligible = <int32_t*>_resize(self.eligible, cap, sizeof(int32_t))
        self.class_pos = <int32_t*>_resize(self.class_pos, cap, sizeof(int32_t))
        for c in range(WEIGHT_CLASSES):
            self.class_members[c] = <int32_t*>_resize(self.class_members[c], cap, sizeof(int32_t))
        self.heap.items = <HeapEntry*>_resize(self.heap.items, cap, sizeof(HeapEntry))
        self.heap.pos = <int32_t*>_resize(self.heap.pos, cap, sizeof(int32_t))
        self.fenwick.tree = <int64_t*>_resize(self.fenwick.tree, cap + 1, sizeof(int64_t))
        self.cap = cap
        fenwick_reset(&self.fenwick, cap)
        for i in range(self.n):
            if self._is_eligible(i):
                fenwick_add(&self.fenwick, i, self.weight[i])
        return 0

    cdef int32_t _append(self, addr, weight) except -1:
        check_addr(addr)
        cdef int32_t w = check_weight(weight)
        if self.n == self.cap:
            self._grow(2 * self.cap)
        cdef int32_t i = <int32_t>self.n
        self.n += 1
        self.addrs.append(addr)
        self.ketama_bases.append(ketama_base(addr) if self.algo == ALGO_KETAMA else None)
        self.weight[i] = w
        self.state[i] = STATE_UP
        self.inflight[i] = 0
        self.picks[i] = 0
        self.failures[i] = 0
        self.consecutive[i] = 0
        self.ewma[i] = 0.0
        self.eligible_pos[i] = -1
        self.links.prev[i] = self.links.next[i] = -1
        self.touched_at[i] = 0
        self.heap.pos[i] = -1
        self._eligibility_changed(i, False, False)
        return i

    cdef inline bint _is_eligible(self, Py_ssize_t i) noexcept:
        return self.state[i] == STATE_UP and self.weight[i] > 0

    cdef inline void fenwick_remove(self, Py_ssize_t i, int32_t weight) noexcept:
        fenwick_add(&self.fenwick, i, -weight)

    cdef void _leave(self, int32_t i, int32_t weight) noexcept:
        """Take i, at its old weight, out of the structures that are kept by weight."""
        cdef int c = weight_class(weight)
        if self.algo == ALGO_ROUNDROBIN:
            self._rr_leave(i, weight)
        cdef Py_ssize_t p = self.class_pos[i]
        cdef int32_t last
        self.fenwick_remove(i, weight)
        self.class_size[c] -= 1
        last = self.class_members[c][self.class_size[c]]
        self.class_members[c][p] = last
        self.class_pos[last] = <int32_t>p
        self.class_pos[i] = -1
        self.class_weight[c] -= weight

    cdef void _weighted_join(self, int32_t i) noexcept:
        cdef int c = weight_class(self.weight[i])
        fenwick_add(&self.fenwick, i, self.weight[i])
        self.class_pos[i] = <int32_t>self.class_size[c]
        self.class_members[c][self.class_size[c]] = i
        self.class_size[c] += 1
        self.class_weight[c] += self.weight[i]

    cdef void _eligibility_changed(self, int32_t i, bint was, bint reentered) noexcept:
        """Bring every structure in line with i's new state or weight.

        Callers have already called _leave with i's old weight if it was eligible.
        """
        cdef bint now = self._is_eligible(i)
        cdef int32_t pos, last
        if was and not now:
            pos = self.eligible_pos[i]
            self.n_eligible -= 1
            last = self.eligible[self.n_eligible]
            self.eligible[pos] = last
            self.eligible_pos[last] = pos
            self.eligible_pos[i] = -1
            heap_remove(&self.heap, i)
            self._lru_unlink(i)
        elif now and not was:
            self.eligible_pos[i] = <int32_t>self.n_eligible
            self.eligible[self.n_eligible] = i
            self.n_eligible += 1
        if now:
            self._weighted_join(i)
            if reentered or not was:
                self._enter(i)

    cdef void _enter(self, int32_t i) noexcept:
        """A backend joins (or rejoins after a weight change) the pick order."""
        if self.algo == ALGO_ROUNDROBIN:
            self._rr_enter(i)
        elif self.algo == ALGO_FIRST:
            heap_set(&self.heap, i, <double>i, 0)
        elif self.algo == ALGO_LEASTCONN or self.algo == ALGO_LEASTTIME:
            self.seq += 1
            heap_set(&self.heap, i, self._load_key(i), self.seq)
        if self.algo == ALGO_LEASTTIME:
            self._lru_touch(i)

    cdef inline double _load_key(self, int32_t i) noexcept:
        if self.algo == ALGO_LEASTCONN:
            return (self.inflight[i] + 1.0) / self.weight[i]
        return (self.ewma[i] + LATENCY_FLOOR) * (self.inflight[i] + 1.0) / self.weight[i]

    cdef inline void _rekey(self, int32_t i) noexcept:
        """A load change requeues the backend behind those of equal load (HAProxy's fwlc)."""
        cdef Py_ssize_t p = self.heap.pos[i]
        if (self.algo == ALGO_LEASTCONN or self.algo == ALGO_LEASTTIME) and p >= 0:
            self.seq += 1
            self.heap.items[p].key = self._load_key(i)
            self.heap.items[p].order = self.seq
            heap_fix(&self.heap, p)

    # roundrobin: backends of one weight advance by the same 1/weight per turn, so a
    # FIFO per weight stays in turn order as long as a joining backend never queues
    # ahead of its class's tail. The next turn is then the head of one of at most 256
    # classes: O(1) with equal weights, O(log distinct weights) at worst.

    cdef inline bint _rr_before(self, int32_t a, int32_t b) noexcept:
        return self.rr_deadline[a] < self.rr_deadline[b] or (
            self.rr_deadline[a] == self.rr_deadline[b] and self.rr_order[a] < self.rr_order[b])

    cdef inline void _rr_class_changed(self, int32_t w) noexcept:
        cdef int32_t head = self.rr_head[w]
        if head < 0:
            heap_remove(&self.rr_classes, w)
        else:
            heap_set(&self.rr_classes, w, self.rr_deadline[head], self.rr_order[head])

    cdef void _rr_enter(self, int32_t i) noexcept:
        cdef int32_t w = self.weight[i], tail = self.rr_tail[w]
        cdef double deadline = self.vtime + self.join_phase / w
        if tail >= 0 and self.rr_deadline[tail] > deadline:
            deadline = self.rr_deadline[tail]
        self.rr_deadline[i] = deadline
        self.seq += 1
        self.rr_order[i] = self.seq
        list_append(&self.links, &self.rr_head[w], &self.rr_tail[w], i)
        if self.rr_head[w] == i:
            self._rr_class_changed(w)

    cdef void _rr_leave(self, int32_t i, int32_t w) noexcept:
        cdef bint was_head = self.rr_head[w] == i
        list_unlink(&self.links, &self.rr_head[w], &self.rr_tail[w], i)
        if was_head:
            self._rr_class_changed(w)

    cdef int32_t _rr_choose(self, int32_t avoid) noexcept:
        cdef int32_t chosen = self.rr_head[self.rr_classes.items[0].id]
        cdef int32_t alternative, w
        # Virtual time is the earliest turn, even when that backend is avoided: it
        # never runs ahead of a waiting backend, so joiners never jump the queue.
        self.vtime = self.rr_deadline[chosen]
        if chosen == avoid:
            alternative = -1
            if self.rr_classes.size >= 2:
                alternative = self.rr_head[self.rr_classes.items[heap_second(&self.rr_classes)].id]
            chosen = self.links.next[avoid]
            if chosen < 0 or (alternative >= 0 and self._rr_before(alternative, chosen)):
                chosen = alternative
        w = self.weight[chosen]
        self.rr_deadline[chosen] += 1.0 / w
        self.seq += 1
        self.rr_order[chosen] = self.seq
        if self.rr_tail[w] != chosen:
            list_unlink(&self.links, &self.rr_head[w], &self.rr_tail[w], chosen)
            list_append(&self.links, &self.rr_head[w], &self.rr_tail[w], chosen)
        self._rr_class_changed(w)
        return chosen

    cdef void _lru_unlink(self, int32_t i) noexcept:
        if self.algo == ALGO_LEASTTIME:
            list_unlink(&self.links, &self.lru_head, &self.lru_tail, i)

    cdef void _lru_touch(self, int32_t i) noexcept:
        """Move i to the most recently picked end."""
        list_unlink(&self.links, &self.lru_head, &self.lru_tail, i)
        list_append(&self.links, &self.lru_head, &self.lru_tail, i)
        self.touched_at[i] = self.clock

    cdef int _rebuild(self) except -1:
        if self.algo == ALGO_KETAMA:
            self._build_ring()
        elif self.algo == ALGO_MAGLEV:
            self._build_table()
        return 0

    cdef int _build_ring(self) except -1:
        cdef Py_ssize_t i, count = 0, at = 0
        for i in range(self.n):
            if self.state[i] != STATE_REMOVED and self.weight[i] > 0:
                count += KETAMA_POINTS_PER_WEIGHT * self.weight[i]
        free(self.ring.hashes)
        free(self.ring.servers)
        self.ring.hashes = <uint32_t*>malloc(count * sizeof(uint32_t) + 1)
        self.ring.servers = <int32_t*>malloc(count * sizeof(int32_t) + 1)
        if self.ring.hashes == NULL or self.ring.servers == NULL:
            raise MemoryError()
        for i in range(self.n):
            if self.state[i] != STATE_REMOVED and self.weight[i] > 0:
                ketama_points(self.ketama_bases[i], KETAMA_POINTS_PER_WEIGHT * self.weight[i],
                              <int32_t>i, self.ring.hashes + at, self.ring.servers + at)
                at += KETAMA_POINTS_PER_WEIGHT * self.weight[i]
        self.ring.size = count
        ring_sort_dedupe(&self.ring)
        return 0

    cdef int _build_table(self) except -1:
        cdef list names = []
        cdef Py_ssize_t i, count = 0
        cdef int32_t* servers = <int32_t*>malloc((self.n + 1) * sizeof(int32_t))
        cdef int32_t* weights = <int32_t*>malloc((self.n + 1) * sizeof(int32_t))
        cdef const char** name_ptrs = <const char**>malloc((self.n + 1) * sizeof(char*))
        cdef Py_ssize_t* name_lens = <Py_ssize_t*>malloc((self.n + 1) * sizeof(Py_ssize_t))
        cdef bytes raw
        try:
            for i in range(self.n):
                if self.state[i] != STATE_REMOVED and self.weight[i] > 0:
                    raw = (<str>self.addrs[i]).encode()
                    names.append(raw)
                    servers[count] = <int32_t>i
                    weights[count] = self.weight[i]
                    name_ptrs[count] = PyBytes_AS_STRING(raw)
                    name_lens[count] = PyBytes_GET_SIZE(raw)
                    count += 1
            free(self.table)
            self.table = maglev_populate(servers, name_ptrs, name_lens, weights, count,
                                         self.table_size)
        finally:
            free(servers)
            free(weights)
            free(name_ptrs)
            free(name_lens)
        return 0

    # ---- choosing ---------------------------------------------------------------

    cdef inline uint64_t _key_hash(self, object key) except? 0:
        cdef bytes raw
        if key is None:
            return splitmix64_next(&self.rng)
        raw = _as_bytes(key)
        return XXH3_64bits(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))

    cdef int32_t _choose(self, uint64_t h, int32_t avoid) noexcept:
        cdef int32_t chosen = -1, head
        cdef uint64_t stale_after
        cdef int algo = self.algo
        if algo == ALGO_ROUNDROBIN:
            return self._rr_choose(avoid)
        if algo == ALGO_RANDOM:
            return self._weighted_draw(&avoid, 1 if avoid >= 0 else 0)
        if algo == ALGO_P2C:
            return self._choose_p2c(avoid)
        if algo >= ALGO_HASH:
            return self._choose_consistent(h, avoid)
        if algo == ALGO_LEASTTIME:
            self.clock += 1
            head = self.lru_head
            stale_after = max(<uint64_t>LEASTTIME_DECAY_PICKS, <uint64_t>(2 * self.n_eligible))
            if (self.clock % LEASTTIME_PROBE_EVERY == 0 and head != avoid
                    and self.clock - self.touched_at[head] > stale_after):
                # Re-measure it: start from the best backend's latency, so its own
                # next sample decides, without a pile-up on a backend still slow.
                self.ewma[head] = min(self.ewma[head], self.ewma[self.heap.items[0].id])
                self._rekey(head)
                chosen = head
        if chosen < 0:
            chosen = heap_best_except(&self.heap, avoid)
        if algo == ALGO_LEASTTIME:
            self._lru_touch(chosen)
        return chosen

    cdef int32_t _weighted_draw(self, int32_t* excluded, Py_ssize_t n_excluded) noexcept:
        """Weighted random draw in O(1): a weight class by its share, then a member by rejection.

        Class c holds weights 2**c .. 2**(c+1) - 1, so a uniform member is kept with
        probability weight / 2**(c+1) >= 1/2: two tries on average, whatever n is.
        Callers guarantee that some eligible backend is not excluded.
        """
        cdef int64_t total = self.fenwick.total, share
        cdef Py_ssize_t k
        cdef int c
        cdef int32_t i
        for k in range(n_excluded):
            total -= self.weight[excluded[k]]
        cdef int64_t r = splitmix64_next(&self.rng) % <uint64_t>total
        for c in range(WEIGHT_CLASSES):
            share = self.class_weight[c]
            for k in range(n_excluded):
                if weight_class(self.weight[excluded[k]]) == c:
                    share -= self.weight[excluded[k]]
            if r < share:
                break
            r -= share
        while True:
            i = self.class_members[c][splitmix64_next(&self.rng) % <uint64_t>self.class_size[c]]
            for k in range(n_excluded):
                if excluded[k] == i:
                    break
            else:
                if <int64_t>(splitmix64_next(&self.rng) & ((<uint64_t>2 << c) - 1)) < self.weight[i]:
                    return i

    cdef int32_t _choose_p2c(self, int32_t avoid) noexcept:
        cdef Py_ssize_t count = self.n_eligible
        cdef Py_ssize_t first_pos, second_pos
        cdef int32_t a, b
        if count == 1:
            return self.eligible[0]
        first_pos = splitmix64_next(&self.rng) % <uint64_t>count
        second_pos = splitmix64_next(&self.rng) % <uint64_t>(count - 1)
        if second_pos >= first_pos:
            second_pos += 1
        a = self.eligible[first_pos]
        b = self.eligible[second_pos]
        if a == avoid:
            return b
        if b == avoid:
            return a
        # (inflight + 1) / weight compared without division
        if (self.inflight[a] + 1) * self.weight[b] > (self.inflight[b] + 1) * self.weight[a]:
            return b
        return a

    cdef inline bint _within_bound(self, int32_t i) noexcept:
        if self.bounded_load <= 0.0:
            return True
        cdef double capacity = ceil(self.bounded_load * <double>(self.total_inflight_count + 1)
                                    * <double>self.weight[i] / <double>self.fenwick.total)
        return self.inflight[i] + 1 <= capacity

    cdef inline int32_t _walk_start(self, uint64_t h) noexcept:
        """Where this key's preference walk starts: an index, ring point or table slot."""
        if self.algo == ALGO_HASH:
            return <int32_t>fenwick_find(&self.fenwick, h % <uint64_t>self.fenwick.total)
        if self.algo == ALGO_KETAMA:
            return <int32_t>ring_lower_bound(&self.ring, <uint32_t>(h & <uint64_t>0xFFFFFFFFUL))
        return <int32_t>(h % <uint64_t>self.table_size)

    cdef inline int32_t _walk_step(self, int32_t at, int32_t* backend) noexcept:
        """The backend at a walk position, and the next position."""
        cdef int64_t r
        if self.algo == ALGO_HASH:
            backend[0] = at
            r = fenwick_prefix(&self.fenwick, at) + self.weight[at]
            return <int32_t>fenwick_find(&self.fenwick, r % self.fenwick.total)
        if self.algo == ALGO_KETAMA:
            backend[0] = self.ring.servers[at]
            return 0 if at + 1 == self.ring.size else at + 1
        backend[0] = self.table[at]
        return 0 if at + 1 == self.table_size else at + 1

    cdef int32_t _choose_consistent(self, uint64_t h, int32_t avoid) noexcept:
        cdef int32_t at = self._walk_start(h), i = -1, fallback = -1
        cdef Py_ssize_t step
        cdef Py_ssize_t steps = WALK_LIMIT
        if self.algo == ALGO_HASH and steps > self.n_eligible:
            steps = self.n_eligible
        for step in range(steps):
            at = self._walk_step(at, &i)
            if i == avoid or not self._is_eligible(i):
                continue
            if self._within_bound(i):
                return i
            if fallback < 0:
                fallback = i
        if fallback >= 0:
            return fallback
        # The ring or table walk met only unavailable backends: hash over those left.
        return self._hash_find(h, avoid)

    cdef inline int32_t _hash_find(self, uint64_t h, int32_t avoid) noexcept:
        """Map-based hashing over the eligible backends other than avoid."""
        cdef int64_t r
        if avoid < 0:
            return <int32_t>fenwick_find(&self.fenwick, h % <uint64_t>self.fenwick.total)
        r = h % <uint64_t>(self.fenwick.total - self.weight[avoid])
        if r >= fenwick_prefix(&self.fenwick, avoid):
            r += self.weight[avoid]
        return <int32_t>fenwick_find(&self.fenwick, r)

    cdef int _heap_next(self, list chosen, Py_ssize_t n) except -1:
        """Append the next best heap entries after the first pick, leaving the heap as it was."""
        cdef HeapEntry entry
        cdef list taken = []
        cdef int32_t first = chosen[0]
        while len(chosen) < n and self.heap.size > 0:
            entry = self.heap.items[0]
            heap_remove(&self.heap, entry.id)
            taken.append(entry)
            if entry.id != first:
                chosen.append(entry.id)
        for entry in taken:
            heap_set(&self.heap, entry.id, entry.key, entry.order)
        return 0

    cdef int _rr_next(self, list chosen, Py_ssize_t n) except -1:
        """Merge the weight-class FIFOs in turn order after the first pick."""
        cdef Py_ssize_t classes = self.rr_classes.size, k, best
        cdef int32_t first = chosen[0]
        cdef int32_t* cursor = <int32_t*>malloc((classes + 1) * sizeof(int32_t))
        for k in range(classes):
            cursor[k] = self.rr_head[self.rr_classes.items[k].id]
            if cursor[k] == first:
                cursor[k] = self.links.next[first]
        while len(chosen) < n:
            best = -1
            for k in range(classes):
                if cursor[k] >= 0 and (best < 0 or self._rr_before(cursor[k], cursor[best])):
                    best = k
            if best < 0:
                break
            chosen.append(cursor[best])
            cursor[best] = self.links.next[cursor[best]]
            if cursor[best] == first:
                cursor[best] = self.links.next[first]
        free(cursor)
        return 0

    cdef int _draws_next(self, list chosen, Py_ssize_t n) except -1:
        """Weighted draws without replacement after the first pick."""
        cdef int32_t* excluded = <int32_t*>malloc(n * sizeof(int32_t))
        cdef Py_ssize_t count = 1
        excluded[0] = chosen[0]
        while count < n and count < self.n_eligible:
            excluded[count] = self._weighted_draw(excluded, count)
            chosen.append(excluded[count])
            count += 1
        free(excluded)
        return 0

    cdef int _walk_next(self, list chosen, Py_ssize_t n, uint64_t h) except -1:
        """Distinct eligible backends in the key's walk order, then in index order."""
        cdef int32_t at = self._walk_start(h), i = -1
        cdef Py_ssize_t step, steps = WALK_LIMIT * n
        if self.algo == ALGO_HASH and steps > self.n_eligible:
            steps = self.n_eligible
        for step in range(steps):
            at = self._walk_step(at, &i)
            if self._is_eligible(i) and i not in chosen:
                chosen.append(i)
                if len(chosen) == n:
                    return 0
        at = <int32_t>fenwick_find(&self.fenwick, h % <uint64_t>self.fenwick.total)
        for step in range(self.n_eligible):
            if at not in chosen:
                chosen.append(at)
                if len(chosen) == n:
                    return 0
            at = <int32_t>fenwick_find(&self.fenwick,
                                       (fenwick_prefix(&self.fenwick, at) + self.weight[at]) % self.fenwick.total)
        return 0

    cdef inline int _check_index(self, Py_ssize_t i) except -1:
        if not 0 <= i < self.n or self.state[i] == STATE_REMOVED:
            raise IndexError(f"no backend {i}")
        return 0


cdef inline int weight_class(int32_t weight) noexcept nogil:
    """floor(log2(weight)) for weights 1..256."""
    cdef int c = 0
    while weight >> (c + 1):
        c += 1
    return c


cdef void* _resize(void* old, Py_ssize_t count, size_t item) except NULL:
    cdef void* new = realloc(old, count * item + 1)
    if new == NULL:
        raise MemoryError()
    return new
