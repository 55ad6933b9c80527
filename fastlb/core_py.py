"""Pure-Python twin of fastlb._core: the reference implementation.

Same API and, for the same seed, the same picks as the compiled core. It is written
to be obviously right, not fast: most picks scan every backend (O(n)). The tests run
each behaviour against both implementations and compare their pick sequences; the
benchmarks use this module as the baseline the compiled core must beat.

Every ordering has a total tie-break (a sequence number), so "the same picks" is exact,
not statistical. The random algorithms share one splitmix64 generator.
"""
from bisect import bisect_left
from math import ceil
import os
import zlib

import xxhash

from fastlb.core_shared import (
    ALGORITHMS, HASHING_ALGORITHMS, STATE_NAMES, check_addr, check_arguments, check_weight,
    initial_phases, is_prime, ketama_host_port, maglev_table_size,
)

__all__ = ["ALGORITHMS", "Balancer", "hash_key"]

UP, DRAIN, DOWN, REMOVED = range(4)
KETAMA_POINTS_PER_WEIGHT = 160      # nginx's ngx_http_upstream_hash_module
EWMA_ALPHA = 0.3                    # weight of the newest latency sample
LATENCY_FLOOR = 1e-6                # keeps in-flight counts meaningful before any sample
LEASTTIME_DECAY_PICKS = 1000        # a backend unpicked this long is probed again,
LEASTTIME_PROBE_EVERY = 50          # ... looked for once every 50 picks (<= 2% of traffic)
WALK_LIMIT = 64                     # ring/table steps before falling back to plain hashing
WEIGHT_CLASSES = 9                  # random: class c holds weights 2**c .. 2**(c+1) - 1
MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1

_HEAP_ALGORITHMS = ("roundrobin", "leastconn", "leasttime", "first")


def hash_key(key):
    """The 64-bit xxh3 hash fastlb uses for every request key."""
    return xxhash.xxh3_64_intdigest(_as_bytes(key))


def _as_bytes(key):
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode()
    return bytes(key)


def ketama_points(addr, weight):
    """nginx's points for one server: crc32(host \\0 port, previous point), chained."""
    host, port = ketama_host_port(addr)
    base = host + b"\0" + port
    previous = 0
    points = []
    for _ in range(KETAMA_POINTS_PER_WEIGHT * weight):
        previous = zlib.crc32(base + previous.to_bytes(4, "little"))
        points.append(previous)
    return points


class Balancer:
    """Backend selection and accounting; backends are known by index.

    See fastlb/_core.pyx for the documented API and each algorithm's cost.
    """

    def __init__(self, addrs, algorithm="roundrobin", weights=None, *,
                 bounded_load=0.0, seed=None, table_size=0):
        addrs, weights = check_arguments(addrs, algorithm, weights, bounded_load)
        self.algorithm = algorithm
        self.bounded_load = float(bounded_load)
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self._rng = seed & MASK64
        self._seq = 0
        self._touches = 0
        self._clock = 0
        self._vtime = 0.0
        self._total_inflight = 0
        self._addr, self._weight, self._state = [], [], []
        self._inflight, self._picks, self._failures, self._consecutive = [], [], [], []
        self._ewma, self._key, self._order = [], [], []
        self._touched, self._touched_at = [], []
        self._eligible, self._eligible_pos = [], []
        self._class_members = [[] for _ in range(WEIGHT_CLASSES)]
        self._class_weight = [0] * WEIGHT_CLASSES
        self._class_pos = []
        self._ring_hashes, self._ring_servers, self._maglev = [], [], []
        self._table_size = table_size or maglev_table_size(len(addrs))
        if not is_prime(self._table_size):
            raise ValueError(f"table_size must be a prime, not {self._table_size}")
        for addr, weight, phase in zip(addrs, weights, initial_phases(weights)):
            self._join_phase = phase
            self._append(addr, weight)
        self._join_phase = 0.5
        self._rebuild()

    # ---- public API -------------------------------------------------------------

    def __len__(self):
        return len(self._addr)

    @property
    def available(self):
        return len(self._eligible)

    @property
    def total_inflight(self):
        return self._total_inflight

    def pick(self, key=None, avoid=-1):
        if not self._eligible:
            return -1
        if avoid >= len(self._addr) or (avoid >= 0 and (len(self._eligible) == 1 or not self._is_eligible(avoid))):
            avoid = -1
        h = self._key_hash(key) if self.algorithm in HASHING_ALGORITHMS else 0
        chosen = self._choose(h, (avoid,) if avoid >= 0 else ())
        self._picks[chosen] += 1
        return chosen

    def candidates(self, key=None, n=2):
        if not self._eligible or n < 1:
            return []
        h = self._key_hash(key) if self.algorithm in HASHING_ALGORITHMS else 0
        first = self._choose(h, ())
        self._picks[first] += 1
        chosen = [first]
        if n == 1:
            return chosen
        algorithm = self.algorithm
        if algorithm == "roundrobin":
            fifos = list(self._rr_classes(excluded=first).values())
            while len(chosen) < n and any(fifos):
                best = min((q for q in fifos if q), key=lambda q: self._order_key(q[0]))
                chosen.append(best.pop(0))
        elif algorithm in _HEAP_ALGORITHMS:
            rest = sorted((i for i in self._eligible if i != first), key=self._order_key)
            chosen.extend(rest[:n - 1])
        elif algorithm in ("random", "p2c"):
            while len(chosen) < n and len(chosen) < len(self._eligible):
                chosen.append(self._weighted_draw(chosen))
        else:
            for i in self._consistent_walk(h, steps=WALK_LIMIT * n):
                if i not in chosen and self._is_eligible(i):
                    chosen.append(i)
                    if len(chosen) == n:
                        break
            if len(chosen) < n:
                start = self._weighted_find(h % self._eligible_weight(()))
                for i in self._index_walk(start):
                    if i not in chosen:
                        chosen.append(i)
                        if len(chosen) == n:
                            break
        return chosen

    def on_connect(self, i):
        self._check_index(i)
        self._inflight[i] += 1
        self._total_inflight += 1
        self._rekey(i)

    def on_close(self, i):
        self._check_index(i)
        if self._inflight[i] > 0:
            self._inflight[i] -= 1
            self._total_inflight -= 1
            self._rekey(i)

    def on_response(self, i, seconds, ok=True):
        self._check_index(i)
        seconds = max(float(seconds), 0.0)
        ewma = self._ewma[i]
        self._ewma[i] = seconds if ewma <= 0.0 else ewma + EWMA_ALPHA * (seconds - ewma)
        if ok:
            self._consecutive[i] = 0
        else:
            self._failures[i] += 1
            self._consecutive[i] += 1
        self._rekey(i)

    def set_weight(self, i, weight):
        self._check_index(i)
        check_weight(weight)
        if weight == self._weight[i]:
            return
        was, old = self._is_eligible(i), self._weight[i]
        self._weight[i] = weight
        self._eligibility_changed(i, was, reentered=was and self._is_eligible(i), old_weight=old)
        if self.algorithm in ("ketama", "maglev"):
            self._rebuild()

    def set_state(self, i, state):
        self._check_index(i)
        try:
            code = STATE_NAMES.index(state, 0, REMOVED)
        except ValueError:
            raise ValueError(f"state must be 'up', 'down' or 'drain', not {state!r}") from None
        if code == self._state[i]:
            return
        was = self._is_eligible(i)
        self._state[i] = code
        self._eligibility_changed(i, was)

    def add(self, addr, weight=1):
        i = self._append(addr, weight)
        self._rebuild()
        return i

    def remove(self, i):
        self._check_index(i)
        was = self._is_eligible(i)
        self._state[i] = REMOVED
        self._total_inflight -= self._inflight[i]
        self._inflight[i] = 0
        self._eligibility_changed(i, was)
        self._rebuild()

    def stats(self, i):
        if not 0 <= i < len(self._addr):
            raise IndexError(f"no backend {i}")
        return {
            "addr": self._addr[i],
            "weight": self._weight[i],
            "state": STATE_NAMES[self._state[i]],
            "inflight": self._inflight[i],
            "picks": self._picks[i],
            "failures": self._failures[i],
            "consecutive_failures": self._consecutive[i],
            "ewma": self._ewma[i],
        }

    # ---- membership ---------------------------------------------------------------

    def _append(self, addr, weight):
        check_addr(addr)
        check_weight(weight)
        i = len(self._addr)
        for column, value in ((self._addr, addr), (self._weight, weight), (self._state, UP),
                              (self._inflight, 0), (self._picks, 0), (self._failures, 0),
                              (self._consecutive, 0), (self._ewma, 0.0), (self._key, 0.0),
                              (self._order, 0), (self._touched, 0), (self._touched_at, 0),
                              (self._eligible_pos, -1), (self._class_pos, -1)):
            column.append(value)
        self._eligibility_changed(i, False)
        return i

    def _is_eligible(self, i):
        return self._state[i] == UP and self._weight[i] > 0

    def _eligibility_changed(self, i, was, reentered=False, old_weight=None):
        now = self._is_eligible(i)
        if was:
            self._class_leave(i, self._weight[i] if old_weight is None else old_weight)
        if now:
            self._class_join(i)
        if was and not now:
            pos = self._eligible_pos[i]
            last = self._eligible.pop()
            if last != i:
                self._eligible[pos] = last
                self._eligible_pos[last] = pos
            self._eligible_pos[i] = -1
        elif now and not was:
            self._eligible_pos[i] = len(self._eligible)
            self._eligible.append(i)
        if now and (reentered or not was):
            self._enter(i)

    def _class_join(self, i):
        members = self._class_members[self._weight[i].bit_length() - 1]
        self._class_pos[i] = len(members)
        members.append(i)
        self._class_weight[self._weight[i].bit_length() - 1] += self._weight[i]

    def _class_leave(self, i, weight):
        c = weight.bit_length() - 1
        members = self._class_members[c]
        last = members.pop()
        if last != i:
            members[self._class_pos[i]] = last
            self._class_pos[last] = self._class_pos[i]
        self._class_pos[i] = -1
        self._class_weight[c] -= weight

    def _enter(self, i):
        """A backend joins (or rejoins after a weight change) the pick order."""
        if self.algorithm == "roundrobin":
            # Half a turn from now, but never ahead of a backend of the same weight:
            # each weight class stays a FIFO, which keeps the compiled pick O(1).
            weight = self._weight[i]
            self._key[i] = self._vtime + self._join_phase / weight
            fifo = self._rr_classes(excluded=i).get(weight)
            if fifo and self._key[fifo[-1]] > self._key[i]:
                self._key[i] = self._key[fifo[-1]]
            self._seq += 1
            self._order[i] = self._seq
        elif self.algorithm == "first":
            self._key[i] = float(i)
        else:
            self._rekey(i)
        self._touches += 1
        self._touched[i] = self._touches
        self._touched_at[i] = self._clock

    def _rekey(self, i):
        """A load change requeues the backend behind those of equal load (HAProxy's fwlc)."""
        if self._weight[i] == 0 or self.algorithm not in ("leastconn", "leasttime"):
            return
        if self.algorithm == "leastconn":
            self._key[i] = (self._inflight[i] + 1.0) / self._weight[i]
        else:
            self._key[i] = (self._ewma[i] + LATENCY_FLOOR) * (self._inflight[i] + 1.0) / self._weight[i]
        self._seq += 1
        self._order[i] = self._seq

    def _rebuild(self):
        if self.algorithm == "ketama":
            points = []
            for i, addr in enumerate(self._addr):
                if self._state[i] != REMOVED and self._weight[i] > 0:
                    points.extend((h, i) for h in ketama_points(addr, self._weight[i]))
            points.sort()
            self._ring_hashes, self._ring_servers = [], []
            for h, i in points:
                if not self._ring_hashes or self._ring_hashes[-1] != h:
                    self._ring_hashes.append(h)
                    self._ring_servers.append(i)
        elif self.algorithm == "maglev":
            self._maglev = self._maglev_populate()

    def _maglev_populate(self):
        size = self._table_size
        entries = []
        for i, addr in enumerate(self._addr):
            if self._state[i] != REMOVED and self._weight[i] > 0:
                raw = addr.encode()
                offset = xxhash.xxh3_64_intdigest(raw, seed=0) % size
                skip = xxhash.xxh3_64_intdigest(raw, seed=1) % (size - 1) + 1
                entries.append([i, offset, skip, self._weight[i], 0, 0])  # ..., next, target
        table = [-1] * size
        if not entries:
            return table
        max_weight = max(e[3] for e in entries)
        filled, iteration = 0, 1
        while filled < size:
            for entry in entries:
                if filled >= size:
                    break
                i, offset, skip, weight, nxt, target = entry
                if iteration * weight < target:
                    continue
                entry[5] = target + max_weight
                slot = (offset + skip * nxt) % size
                while table[slot] >= 0:
                    nxt += 1
                    slot = (offset + skip * nxt) % size
                table[slot] = i
                entry[4] = nxt + 1
                filled += 1
            iteration += 1
        return table

    # ---- choosing -------------------------------------------------------------------

    def _choose(self, h, avoid):
        algorithm = self.algorithm
        if algorithm in _HEAP_ALGORITHMS:
            return self._choose_ordered(avoid)
        if algorithm == "random":
            return self._weighted_draw(avoid)
        if algorithm == "p2c":
            return self._choose_p2c(avoid)
        return self._choose_consistent(h, avoid)

    def _order_key(self, i):
        return (self._key[i], self._order[i])

    def _rr_classes(self, excluded=-1):
        """Each weight's FIFO: its eligible backends in the order they queued.

        Backends of one weight advance by the same 1/weight, so a FIFO per weight is in
        turn order (the compiled core keeps exactly these queues; defining the order by
        them, not by comparing rounded deadlines across a queue, keeps both identical).
        """
        fifos = {}
        for j in sorted(self._eligible, key=self._order.__getitem__):
            if j != excluded:
                fifos.setdefault(self._weight[j], []).append(j)
        return fifos

    def _choose_roundrobin(self, avoid):
        fifos = self._rr_classes()
        chosen = min((q[0] for q in fifos.values()), key=self._order_key)
        # Virtual time is the earliest turn, even when that backend is avoided: it
        # never runs ahead of a waiting backend, so joiners never jump the queue.
        self._vtime = self._key[chosen]
        if chosen in avoid:
            options = [q[0] for q in fifos.values() if q[0] != chosen]
            own = fifos[self._weight[chosen]]
            if len(own) > 1:
                options.append(own[1])
            chosen = min(options, key=self._order_key)
        self._key[chosen] += 1.0 / self._weight[chosen]
        self._seq += 1
        self._order[chosen] = self._seq
        return chosen

    def _choose_ordered(self, avoid):
        algorithm = self.algorithm
        if algorithm == "roundrobin":
            return self._choose_roundrobin(avoid)
        chosen = -1
        if algorithm == "leasttime":
            self._clock += 1
            head = min(self._eligible, key=self._touched.__getitem__)
            stale_after = max(LEASTTIME_DECAY_PICKS, 2 * len(self._eligible))
            if (self._clock % LEASTTIME_PROBE_EVERY == 0 and head not in avoid
                    and self._clock - self._touched_at[head] > stale_after):
                # Re-measure it: start from the best backend's latency, so its own
                # next sample decides, without a pile-up on a backend still slow.
                best = min(self._eligible, key=self._order_key)
                self._ewma[head] = min(self._ewma[head], self._ewma[best])
                self._rekey(head)
                chosen = head
        if chosen < 0:
            chosen = min((i for i in self._eligible if i not in avoid), key=self._order_key)
        if algorithm == "leasttime":
            self._touches += 1
            self._touched[chosen] = self._touches
            self._touched_at[chosen] = self._clock
        return chosen

    def _next_random(self):
        """splitmix64: tiny, fast, and easy to mirror exactly in C."""
        self._rng = (self._rng + 0x9E3779B97F4A7C15) & MASK64
        z = self._rng
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def _eligible_weight(self, excluded):
        return sum(self._weight[i] for i in self._eligible if i not in excluded)

    def _weighted_find(self, r, excluded=()):
        """The backend owning position r of the eligible weights laid out in index order."""
        for i in range(len(self._addr)):
            if self._is_eligible(i) and i not in excluded:
                if r < self._weight[i]:
                    return i
                r -= self._weight[i]
        raise AssertionError("position beyond the total weight")

    def _weighted_draw(self, excluded):
        """Weighted random draw in O(1): a weight class by its share, then a member by rejection.

        Class c holds weights 2**c .. 2**(c+1) - 1, so a uniform member is kept with
        probability weight / 2**(c+1) >= 1/2: two tries on average, whatever n is.
        """
        r = self._next_random() % self._eligible_weight(excluded)
        for c in range(WEIGHT_CLASSES):
            share = self._class_weight[c] - sum(self._weight[x] for x in excluded
                                                if self._weight[x].bit_length() - 1 == c)
            if r < share:
                break
            r -= share
        members = self._class_members[c]
        while True:
            i = members[self._next_random() % len(members)]
            if i not in excluded and self._next_random() % (2 << c) < self._weight[i]:
                return i

    def _choose_p2c(self, avoid):
        count = len(self._eligible)
        if count == 1:
            return self._eligible[0]
        first_pos = self._next_random() % count
        second_pos = self._next_random() % (count - 1)
        if second_pos >= first_pos:
            second_pos += 1
        a, b = self._eligible[first_pos], self._eligible[second_pos]
        if a in avoid:
            return b
        if b in avoid:
            return a
        # Compare (inflight + 1) / weight without division.
        if (self._inflight[a] + 1) * self._weight[b] > (self._inflight[b] + 1) * self._weight[a]:
            return b
        return a

    def _key_hash(self, key):
        return self._next_random() if key is None else hash_key(key)

    def _within_bound(self, i):
        if self.bounded_load <= 0.0:
            return True
        capacity = ceil(self.bounded_load * (self._total_inflight + 1) * self._weight[i]
                        / self._eligible_weight(()))
        return self._inflight[i] + 1 <= capacity

    def _choose_consistent(self, h, avoid):
        fallback = -1
        for i in self._consistent_walk(h, WALK_LIMIT):
            if i in avoid or not self._is_eligible(i):
                continue
            if self._within_bound(i):
                return i
            if fallback < 0:
                fallback = i
        if fallback >= 0:
            return fallback
        # The ring or table walk met only unavailable backends: hash over those left.
        return self._weighted_find(h % self._eligible_weight(avoid), avoid)

    def _consistent_walk(self, h, steps):
        """Backends in this key's preference order (may repeat, may be unavailable)."""
        algorithm = self.algorithm
        if algorithm == "hash":
            start = self._weighted_find(h % self._eligible_weight(()))
            walk = self._index_walk(start)
        elif algorithm == "ketama":
            walk = self._ring_walk(h & MASK32)
        else:
            walk = self._table_walk(h % self._table_size)
        for step, i in enumerate(walk):
            if step >= steps:
                return
            yield i

    def _index_walk(self, start):
        n = len(self._addr)
        for offset in range(n):
            i = (start + offset) % n
            if self._is_eligible(i):
                yield i

    def _ring_walk(self, h32):
        count = len(self._ring_hashes)
        if count == 0:
            return
        pos = bisect_left(self._ring_hashes, h32)
        for offset in range(count):
            yield self._ring_servers[(pos + offset) % count]

    def _table_walk(self, slot):
        size = self._table_size
        for offset in range(size):
            i = self._maglev[(slot + offset) % size]
            if i >= 0:
                yield i

    def _check_index(self, i):
        if not 0 <= i < len(self._addr) or self._state[i] == REMOVED:
            raise IndexError(f"no backend {i}")

