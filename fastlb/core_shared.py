"""What the compiled core (fastlb._core) and its pure-Python twin (fastlb.core_py) share:
names, limits, argument checks and the set-up arithmetic that is not on the pick path."""

ALGORITHMS = ("roundrobin", "random", "leastconn", "leasttime", "p2c", "first",
              "hash", "ketama", "maglev")
HASHING_ALGORITHMS = ("hash", "ketama", "maglev")
STATE_NAMES = ("up", "drain", "down", "removed")
MAX_WEIGHT = 256
MAGLEV_MIN_TABLE_SIZE = 65537       # prime; grown to a prime >= 100 x backends


def check_arguments(addrs, algorithm, weights, bounded_load):
    """Validate a Balancer's arguments; returns (addrs, weights) as lists."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
    addrs = list(addrs)
    weights = [1] * len(addrs) if weights is None else list(weights)
    if len(weights) != len(addrs):
        raise ValueError(f"{len(weights)} weights for {len(addrs)} backends")
    for weight in weights:
        check_weight(weight)
    if bounded_load and bounded_load < 1.0:
        raise ValueError(f"bounded_load must be 0 (off) or >= 1.0, not {bounded_load}")
    if bounded_load and algorithm not in HASHING_ALGORITHMS:
        raise ValueError(f"bounded_load applies to hash, ketama and maglev, not {algorithm}")
    return addrs, weights


def check_weight(weight):
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"weight must be an integer from 0 to {MAX_WEIGHT}, not {weight!r}")
    return weight


def check_addr(addr):
    if not isinstance(addr, str) or not addr:
        raise ValueError(f"backend address must be a non-empty 'host:port' string, not {addr!r}")
    return addr


def initial_phases(weights):
    """Where in its first turn each backend starts: the members of a weight class
    spread evenly, (j + 1/2) / m, so that weights 5, 1, 1 give a b a a a c a and not
    a a b c a a a. Backends joining later start half a turn from now."""
    count, seen, phases = {}, {}, []
    for w in weights:
        count[w] = count.get(w, 0) + 1
    for w in weights:
        phases.append((seen.get(w, 0) + 0.5) / count[w])
        seen[w] = seen.get(w, 0) + 1
    return phases


def ketama_host_port(addr):
    """Split an address the way nginx does before hashing it onto the ring."""
    raw = addr.encode()
    if raw[:5].lower() == b"unix:":
        return raw[5:], b""
    colon = raw.rfind(b":")
    if colon >= 0 and raw[colon + 1:].isdigit():
        return raw[:colon], raw[colon + 1:]
    return raw, b""


def maglev_table_size(n_backends):
    """Smallest prime >= max(65537, 100 x backends): ~100 slots a backend keeps balance."""
    size = max(MAGLEV_MIN_TABLE_SIZE, 100 * n_backends)
    while not is_prime(size):
        size += 1
    return size


def is_prime(n):
    if n < 2 or n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True
