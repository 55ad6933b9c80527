# Shared constants of the compiled core; fastlb/core_py.py holds the same values.

cdef enum:
    ALGO_ROUNDROBIN = 0
    ALGO_RANDOM = 1
    ALGO_LEASTCONN = 2
    ALGO_LEASTTIME = 3
    ALGO_P2C = 4
    ALGO_FIRST = 5
    ALGO_HASH = 6
    ALGO_KETAMA = 7
    ALGO_MAGLEV = 8

cdef enum:
    STATE_UP = 0
    STATE_DRAIN = 1
    STATE_DOWN = 2
    STATE_REMOVED = 3

cdef enum:
    MAX_WEIGHT = 256
    KETAMA_POINTS_PER_WEIGHT = 160      # nginx's ngx_http_upstream_hash_module
    MAGLEV_MIN_TABLE_SIZE = 65537       # prime; grown to a prime >= 100 x backends
    LEASTTIME_DECAY_PICKS = 1000        # a backend unpicked this long is probed again,
    LEASTTIME_PROBE_EVERY = 50          # ... looked for once every 50 picks (<= 2% of traffic)
    RING_INDEX_BITS = 16                # ketama: points indexed by their top 16 bits
    WALK_LIMIT = 64                     # ring/table steps before falling back to plain hashing
    WEIGHT_CLASSES = 9                  # random: class c holds weights 2**c .. 2**(c+1) - 1

cdef double EWMA_ALPHA = 0.3            # weight of the newest latency sample
cdef double LATENCY_FLOOR = 1e-6        # keeps in-flight counts meaningful before any sample
