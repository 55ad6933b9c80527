# Indexed 4-ary min-heap ordered by (key, order), entries stored inline.
# The order column is a unique sequence number, so the order is total and every
# implementation that respects it picks the same backend. Four children per node
# halve the depth of a binary heap and keep siblings close in memory. push, remove
# and update are O(log n); the best entry is O(1), and so is the best one other than
# `avoid` (the root or one of the root's children). leastconn and leasttime keep
# backends in one; roundrobin keeps its weight classes in one.

cdef struct HeapEntry:
    double key
    uint64_t order
    int32_t id          # a backend index, or a weight class for roundrobin

cdef struct Heap:
    HeapEntry* items
    int32_t* pos        # pos[id] = its place in items, or -1
    Py_ssize_t size


cdef inline bint entry_less(HeapEntry* a, HeapEntry* b) noexcept nogil:
    return a.key < b.key or (a.key == b.key and a.order < b.order)


cdef void heap_sift_up(Heap* h, Py_ssize_t p) noexcept nogil:
    cdef HeapEntry moving = h.items[p]
    cdef Py_ssize_t parent
    while p > 0:
        parent = (p - 1) >> 2
        if not entry_less(&moving, &h.items[parent]):
            break
        h.items[p] = h.items[parent]
        h.pos[h.items[p].id] = <int32_t>p
        p = parent
    h.items[p] = moving
    h.pos[moving.id] = <int32_t>p


cdef void heap_sift_down(Heap* h, Py_ssize_t p) noexcept nogil:
    cdef HeapEntry moving = h.items[p]
    cdef Py_ssize_t first, last, c, best
    while True:
        first = 4 * p + 1
        if first >= h.size:
            break
        last = first + 4 if first + 4 < h.size else h.size
        best = first
        for c in range(first + 1, last):
            if entry_less(&h.items[c], &h.items[best]):
                best = c
        if not entry_less(&h.items[best], &moving):
            break
        h.items[p] = h.items[best]
        h.pos[h.items[p].id] = <int32_t>p
        p = best
    h.items[p] = moving
    h.pos[moving.id] = <int32_t>p


cdef inline void heap_fix(Heap* h, Py_ssize_t p) noexcept nogil:
    """Restore order after the entry at p changed its key or order."""
    if p > 0 and entry_less(&h.items[p], &h.items[(p - 1) >> 2]):
        heap_sift_up(h, p)
    else:
        heap_sift_down(h, p)


cdef void heap_set(Heap* h, int32_t id, double key, uint64_t order) noexcept nogil:
    """Insert id, or move it, with this key and order."""
    cdef Py_ssize_t p = h.pos[id]
    if p < 0:
        p = h.size
        h.size += 1
        h.pos[id] = <int32_t>p
    h.items[p].key = key
    h.items[p].order = order
    h.items[p].id = id
    heap_fix(h, p)


cdef void heap_remove(Heap* h, int32_t id) noexcept nogil:
    cdef Py_ssize_t p = h.pos[id]
    if p < 0:
        return
    h.pos[id] = -1
    h.size -= 1
    if p == h.size:
        return
    h.items[p] = h.items[h.size]
    h.pos[h.items[p].id] = <int32_t>p
    heap_fix(h, p)


cdef inline Py_ssize_t heap_second(Heap* h) noexcept nogil:
    """Place of the smallest entry after the root (callers guarantee size >= 2)."""
    cdef Py_ssize_t c, best = 1
    cdef Py_ssize_t last = 5 if 5 < h.size else h.size
    for c in range(2, last):
        if entry_less(&h.items[c], &h.items[best]):
            best = c
    return best


cdef inline int32_t heap_best_except(Heap* h, int32_t avoid) noexcept nogil:
    """The smallest id other than `avoid` (callers guarantee one exists)."""
    if h.items[0].id != avoid:
        return h.items[0].id
    return h.items[heap_second(h)].id
