# Ketama consistent-hash ring with nginx's parameters (ngx_http_upstream_hash_module,
# "hash ... consistent"): 160 points per weight unit; point j of a server is
# crc32(host "\0" port, point j-1 as 4 little-endian bytes), point -1 being 0.
# Build: O(P) to hash P points and O(P) to sort them (LSD radix, two 16-bit passes,
# stable so equal hashes keep server order; the first one wins, as in nginx).
# Lookup: the first point >= the key's low 32 bits, found by binary search inside the
# bucket of its top 16 bits (an index of 65,536 starts): O(1) expected, instead of
# ~21 cache misses for a plain binary search over 10,000 backends' 1.6M points.

cdef uint32_t CRC32_TABLE[256]


cdef void crc32_init_table() noexcept nogil:
    cdef uint32_t c
    cdef int n, k
    for n in range(256):
        c = <uint32_t>n
        for k in range(8):
            c = (<uint32_t>0xEDB88320UL ^ (c >> 1)) if (c & 1) else (c >> 1)
        CRC32_TABLE[n] = c


cdef inline uint32_t crc32_update(uint32_t crc, const unsigned char* data, Py_ssize_t n) noexcept nogil:
    """ngx_crc32_update: the running value before the final xor."""
    cdef Py_ssize_t k
    for k in range(n):
        crc = CRC32_TABLE[(crc ^ data[k]) & 0xFF] ^ (crc >> 8)
    return crc


cdef struct Ring:
    uint32_t* hashes
    int32_t* servers
    Py_ssize_t size
    uint32_t* index     # index[b] = first point whose top bits are >= b; 2^16 + 1 entries


cdef uint32_t ketama_base(str addr):
    cdef bytes host, port
    host, port = ketama_host_port(addr)
    cdef uint32_t crc = crc32_update(<uint32_t>0xFFFFFFFFUL, host, len(host))
    crc = crc32_update(crc, b"\0", 1)
    return crc32_update(crc, port, len(port))


cdef void ketama_points(uint32_t base, Py_ssize_t count, int32_t server,
                        uint32_t* hashes, int32_t* servers) noexcept nogil:
    cdef uint32_t previous = 0
    cdef unsigned char le[4]
    cdef Py_ssize_t j
    for j in range(count):
        le[0] = previous & 0xFF
        le[1] = (previous >> 8) & 0xFF
        le[2] = (previous >> 16) & 0xFF
        le[3] = (previous >> 24) & 0xFF
        previous = crc32_update(base, le, 4) ^ <uint32_t>0xFFFFFFFFUL
        hashes[j] = previous
        servers[j] = server


cdef void radix_pass(uint32_t* src_h, int32_t* src_s, uint32_t* dst_h, int32_t* dst_s,
                     Py_ssize_t n, int shift) noexcept nogil:
    cdef Py_ssize_t* counts = <Py_ssize_t*>calloc(65537, sizeof(Py_ssize_t))
    cdef Py_ssize_t k, d
    for k in range(n):
        counts[((src_h[k] >> shift) & 0xFFFF) + 1] += 1
    for d in range(65536):
        counts[d + 1] += counts[d]
    for k in range(n):
        d = (src_h[k] >> shift) & 0xFFFF
        dst_h[counts[d]] = src_h[k]
        dst_s[counts[d]] = src_s[k]
        counts[d] += 1
    free(counts)


cdef void ring_sort_dedupe(Ring* r) noexcept nogil:
    cdef uint32_t* tmp_h = <uint32_t*>malloc(r.size * sizeof(uint32_t) + 1)
    cdef int32_t* tmp_s = <int32_t*>malloc(r.size * sizeof(int32_t) + 1)
    cdef Py_ssize_t k, kept = 0
    radix_pass(r.hashes, r.servers, tmp_h, tmp_s, r.size, 0)
    radix_pass(tmp_h, tmp_s, r.hashes, r.servers, r.size, 16)
    free(tmp_h)
    free(tmp_s)
    for k in range(r.size):
        if kept == 0 or r.hashes[kept - 1] != r.hashes[k]:
            r.hashes[kept] = r.hashes[k]
            r.servers[kept] = r.servers[k]
            kept += 1
    r.size = kept
    ring_index(r)


cdef void ring_index(Ring* r) noexcept nogil:
    """index[b]: the first point whose top RING_INDEX_BITS bits are >= b."""
    cdef Py_ssize_t k
    free(r.index)
    r.index = <uint32_t*>malloc(((1 << RING_INDEX_BITS) + 1) * sizeof(uint32_t))
    cdef Py_ssize_t bucket = 0
    for k in range(r.size):
        while bucket <= (r.hashes[k] >> (32 - RING_INDEX_BITS)):
            r.index[bucket] = <uint32_t>k
            bucket += 1
    while bucket <= (1 << RING_INDEX_BITS):
        r.index[bucket] = <uint32_t>r.size
        bucket += 1


cdef int ring_add_server(Ring* r, uint32_t base, Py_ssize_t count, int32_t server) except -1:
    """Merges the points of a server whose index is above every other's into a sorted ring: what a
    rebuild would make (where two points are equal the lower server index wins, so the new one loses),
    in O(P) copying instead of hashing and sorting all P points again."""
    cdef Ring extra
    cdef Py_ssize_t i = 0, j = 0, k = 0
    cdef uint32_t* hashes
    cdef int32_t* servers
    if count <= 0:
        return 0
    extra.hashes = <uint32_t*>malloc(count * sizeof(uint32_t) + 1)
    extra.servers = <int32_t*>malloc(count * sizeof(int32_t) + 1)
    extra.index = NULL
    extra.size = count
    hashes = <uint32_t*>malloc((r.size + count) * sizeof(uint32_t) + 1)
    servers = <int32_t*>malloc((r.size + count) * sizeof(int32_t) + 1)
    if extra.hashes == NULL or extra.servers == NULL or hashes == NULL or servers == NULL:
        free(extra.hashes); free(extra.servers); free(hashes); free(servers)
        raise MemoryError()
    ketama_points(base, count, server, extra.hashes, extra.servers)
    ring_sort_dedupe(&extra)
    while i < r.size and j < extra.size:
        if r.hashes[i] <= extra.hashes[j]:
            if r.hashes[i] == extra.hashes[j]:
                j += 1                          # taken by an existing (lower-indexed) server
            hashes[k] = r.hashes[i]
            servers[k] = r.servers[i]
            i += 1
        else:
            hashes[k] = extra.hashes[j]
            servers[k] = extra.servers[j]
            j += 1
        k += 1
    while i < r.size:
        hashes[k] = r.hashes[i]
        servers[k] = r.servers[i]
        i += 1
        k += 1
    while j < extra.size:
        hashes[k] = extra.hashes[j]
        servers[k] = extra.servers[j]
        j += 1
        k += 1
    free(extra.hashes); free(extra.servers); free(extra.index)
    free(r.hashes); free(r.servers)
    r.hashes = hashes
    r.servers = servers
    r.size = k
    ring_index(r)
    return 0


cdef inline Py_ssize_t ring_lower_bound(Ring* r, uint32_t h) noexcept nogil:
    """First point with hash >= h, wrapping to 0 past the end."""
    cdef uint32_t bucket = h >> (32 - RING_INDEX_BITS)
    cdef Py_ssize_t lo = r.index[bucket], hi = r.index[bucket + 1], mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if r.hashes[mid] < h:
            lo = mid + 1
        else:
            hi = mid
    return 0 if lo == r.size else lo
