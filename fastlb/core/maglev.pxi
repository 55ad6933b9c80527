# Maglev lookup table (Eisenbud et al., NSDI 2016), weighted the way Envoy does it:
# each round, a backend fills its next preferred empty slot only when its weight
# has earned it, so slot shares follow weights. The table size M is prime.
# Build: O(M log M) expected (the last slots need the longest permutation walks);
# lookup: O(1), one slot. Offsets and skips come from xxh3 of the address.

cdef int32_t* maglev_populate(int32_t* servers, const char** names, Py_ssize_t* name_lens,
                              int32_t* weights, Py_ssize_t count, Py_ssize_t size) noexcept nogil:
    cdef int32_t* table = <int32_t*>malloc(size * sizeof(int32_t))
    cdef uint64_t* offset = <uint64_t*>malloc((count + 1) * sizeof(uint64_t))
    cdef uint64_t* skip = <uint64_t*>malloc((count + 1) * sizeof(uint64_t))
    cdef uint64_t* nxt = <uint64_t*>calloc(count + 1, sizeof(uint64_t))
    cdef int64_t* target = <int64_t*>calloc(count + 1, sizeof(int64_t))
    cdef Py_ssize_t e, filled = 0
    cdef int64_t iteration = 1, max_weight = 0
    cdef uint64_t slot
    for e in range(size):
        table[e] = -1
    for e in range(count):
        offset[e] = XXH3_64bits_withSeed(names[e], name_lens[e], 0) % <uint64_t>size
        skip[e] = XXH3_64bits_withSeed(names[e], name_lens[e], 1) % <uint64_t>(size - 1) + 1
        if weights[e] > max_weight:
            max_weight = weights[e]
    while count > 0 and filled < size:
        for e in range(count):
            if filled >= size:
                break
            if iteration * weights[e] < target[e]:
                continue
            target[e] += max_weight
            slot = (offset[e] + skip[e] * nxt[e]) % <uint64_t>size
            while table[slot] >= 0:
                nxt[e] += 1
                slot = (offset[e] + skip[e] * nxt[e]) % <uint64_t>size
            table[slot] = servers[e]
            nxt[e] += 1
            filled += 1
        iteration += 1
    free(offset)
    free(skip)
    free(nxt)
    free(target)
    return table
