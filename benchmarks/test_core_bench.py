"""Cost of the balancer core, against the targets of the core's issue.

    make bench-core        (= pytest benchmarks/test_core_bench.py)

Each benchmark records its fastest round; the last test prints every figure next to
its target and fails if one is missed. Targets (per call, from Python):
  pick at 10 backends          <= 150 ns (<= 300 ns for hash, ketama, maglev with a 32-byte key)
  pick at 10,000 backends      <= 2x the pick at 10
  compiled core                >= 5x faster per pick than the pure-Python twin
  connect+close, state, weight O(log n) or better: at 10,000 <= 4x (log 10,000 / log 10) the cost at 10
  ring / table rebuild         <= 20 ms for 1,000 backends
"""
import pytest

from fastlb import _core, core_py

ALGORITHMS = _core.ALGORITHMS
HASHING = ("hash", "ketama", "maglev")
KEY = b"k" * 32
MEASURED = {}  # (what, algorithm, size) -> seconds per call


def addrs(n):
    return [f"10.{i // 62500}.{i // 250 % 250}.{i % 250}:80" for i in range(n)]


def make(impl, algorithm, n):
    # Mixed weights so that weighted structures do real work.
    return impl.Balancer(addrs(n), algorithm=algorithm, weights=[1 + i % 4 for i in range(n)], seed=1)


def record(benchmark, what, algorithm, size):
    MEASURED[(what, algorithm, size)] = benchmark.stats.stats.min


def pick_call(balancer, algorithm):
    if algorithm in HASHING:
        return lambda: balancer.pick(KEY)
    return balancer.pick


@pytest.mark.parametrize("size", [10, 10_000])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pick(benchmark, algorithm, size):
    benchmark.group = f"pick {algorithm}"
    balancer = make(_core, algorithm, size)
    benchmark(pick_call(balancer, algorithm))
    record(benchmark, "pick", algorithm, size)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pick_pure_python_twin(benchmark, algorithm):
    benchmark.group = f"pick {algorithm}"
    balancer = make(core_py, algorithm, 10)
    benchmark(pick_call(balancer, algorithm))
    record(benchmark, "twin pick", algorithm, 10)


@pytest.mark.parametrize("size", [10, 10_000])
@pytest.mark.parametrize("algorithm", ["roundrobin", "leastconn", "leasttime", "p2c"])
def test_connect_close(benchmark, algorithm, size):
    benchmark.group = f"connect+close {algorithm}"
    balancer = make(_core, algorithm, size)
    for i in range(size):  # a realistic spread of in-flight counts
        for _ in range(i % 3):
            balancer.on_connect(i)
    target = size // 2

    def connect_close():
        balancer.on_connect(target)
        balancer.on_close(target)

    benchmark(connect_close)
    record(benchmark, "connect+close", algorithm, size)


@pytest.mark.parametrize("size", [10, 10_000])
@pytest.mark.parametrize("algorithm", ["roundrobin", "random", "leastconn", "hash", "ketama", "maglev"])
def test_state_flap(benchmark, algorithm, size):
    benchmark.group = f"down+up {algorithm}"
    balancer = make(_core, algorithm, size)
    target = size // 2

    def flap():
        balancer.set_state(target, "down")
        balancer.set_state(target, "up")

    benchmark(flap)
    record(benchmark, "down+up", algorithm, size)


@pytest.mark.parametrize("size", [10, 10_000])
@pytest.mark.parametrize("algorithm", ["roundrobin", "random", "leastconn", "hash"])
def test_weight_change(benchmark, algorithm, size):
    benchmark.group = f"set_weight {algorithm}"
    balancer = make(_core, algorithm, size)
    target = size // 2

    def reweight():
        balancer.set_weight(target, 7)
        balancer.set_weight(target, 2)

    benchmark(reweight)
    record(benchmark, "set_weight x2", algorithm, size)


@pytest.mark.parametrize("algorithm", ["ketama", "maglev"])
def test_rebuild_1000_backends(benchmark, algorithm):
    benchmark.group = "rebuild"
    balancer = _core.Balancer(addrs(1000), algorithm=algorithm, seed=1)
    weights = iter(range(10**9))

    def rebuild():  # a weight change rebuilds the ring or table
        balancer.set_weight(0, 1 + next(weights) % 2)

    benchmark.pedantic(rebuild, rounds=10, iterations=1, warmup_rounds=1)
    record(benchmark, "rebuild", algorithm, 1000)


def test_targets():
    """Every figure against its target; run last (pytest keeps file order)."""
    rows, missed = [], []

    def check(label, value, limit, unit, ok):
        rows.append(f"{label:<44} {value:>10.2f} {unit:<3} target {limit}")
        if not ok:
            missed.append(rows[-1])

    for algorithm in ALGORITHMS:
        small, large = MEASURED[("pick", algorithm, 10)], MEASURED[("pick", algorithm, 10_000)]
        budget = 300 if algorithm in HASHING else 150
        check(f"pick {algorithm} @10", small * 1e9, f"<= {budget} ns", "ns", small * 1e9 <= budget)
        check(f"pick {algorithm} @10k / @10", large / small, "<= 2.0x", "x", large / small <= 2.0)
        twin = MEASURED[("twin pick", algorithm, 10)]
        check(f"pick {algorithm} twin / compiled", twin / small, ">= 5x", "x", twin / small >= 5)
    for (what, algorithm, size), value in sorted(MEASURED.items()):
        if size == 10 and what in ("connect+close", "down+up", "set_weight x2"):
            ratio = MEASURED[(what, algorithm, 10_000)] / value
            check(f"{what} {algorithm} @10k / @10", ratio, "<= 4x (log n)", "x", ratio <= 4.0)
    for algorithm in ("ketama", "maglev"):
        ms = MEASURED[("rebuild", algorithm, 1000)] * 1e3
        check(f"rebuild {algorithm} @1000", ms, "<= 20 ms", "ms", ms <= 20)
    print("\n" + "\n".join(rows))
    assert not missed, "targets missed:\n" + "\n".join(missed)
