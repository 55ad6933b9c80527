# Fenwick (binary indexed) tree over the eligible backends' weights, in index order.
# It answers "which backend owns position r of the total weight" in O(log n), and
# absorbs a weight or state change in O(log n): weighted random, map-based hashing
# and the fallback of the consistent hashes all use it without ever rebuilding a table.

cdef struct Fenwick:
    int64_t* tree       # 1-based partial sums, cap + 1 entries
    Py_ssize_t cap
    Py_ssize_t top_bit  # largest power of two <= cap
    int64_t total


cdef void fenwick_reset(Fenwick* f, Py_ssize_t cap) noexcept nogil:
    f.cap = cap
    f.total = 0
    memset(f.tree, 0, (cap + 1) * sizeof(int64_t))
    f.top_bit = 1
    while f.top_bit * 2 <= cap:
        f.top_bit *= 2


cdef inline void fenwick_add(Fenwick* f, Py_ssize_t i, int64_t delta) noexcept nogil:
    f.total += delta
    i += 1
    while i <= f.cap:
        f.tree[i] += delta
        i += i & -i


cdef inline int64_t fenwick_prefix(Fenwick* f, Py_ssize_t i) noexcept nogil:
    """Sum of the weights of backends 0 .. i-1."""
    cdef int64_t s = 0
    while i > 0:
        s += f.tree[i]
        i -= i & -i
    return s


cdef inline Py_ssize_t fenwick_find(Fenwick* f, int64_t r) noexcept nogil:
    """The backend owning position r (0 <= r < total)."""
    cdef Py_ssize_t p = 0
    cdef Py_ssize_t step = f.top_bit
    while step > 0:
        if p + step <= f.cap and f.tree[p + step] <= r:
            p += step
            r -= f.tree[p]
        step >>= 1
    return p
