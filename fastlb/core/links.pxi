# Intrusive doubly linked lists over backend indexes: O(1) append and unlink.
# The prev/next columns are shared by every list a backend can be on (it is on at
# most one): leasttime's least-recently-picked list, roundrobin's weight-class FIFOs.

cdef struct Links:
    int32_t* prev
    int32_t* next


cdef inline void list_unlink(Links* links, int32_t* head, int32_t* tail, int32_t i) noexcept nogil:
    cdef int32_t p = links.prev[i], q = links.next[i]
    if p >= 0:
        links.next[p] = q
    elif head[0] == i:
        head[0] = q
    if q >= 0:
        links.prev[q] = p
    elif tail[0] == i:
        tail[0] = p
    links.prev[i] = links.next[i] = -1


cdef inline void list_append(Links* links, int32_t* head, int32_t* tail, int32_t i) noexcept nogil:
    links.prev[i] = tail[0]
    links.next[i] = -1
    if tail[0] >= 0:
        links.next[tail[0]] = i
    else:
        head[0] = i
    tail[0] = i
