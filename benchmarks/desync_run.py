"""A long run of the request-desync harness (tests/desync.py) against a real fastlb, on both HTTP data
paths: random request sequences (methods, bodies by length / chunked / none, Upgrade, Expect, early
backend answers, backend closes and resets, client aborts, pipelining) through fastlb to an oracle backend
that fails on any byte it did not expect.

    python3 benchmarks/desync_run.py --sequences 20000 --seed 1

Prints, per engine, the number of sequences and requests sent, requests the backend received, backend
connections, and every violation found (the count must be 0). Exit status 1 when any was found.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from desync import run_sample, through_fastlb  # noqa: E402


async def one_engine(engine: str, seed: int, sequences: int, concurrency: int, backends: int,
                     extra: tuple) -> int:
    os.environ["FASTLB_HTTP_ENGINE"] = engine
    started = time.monotonic()
    async with through_fastlb(backends=backends, extra=extra) as (port, registry, oracle):
        problems = []
        done = 0
        batch = 1000                       # a fresh seed per batch, so progress shows as it goes
        while done < sequences:
            count = min(batch, sequences - done)
            problems += await run_sample(port, registry, seed + done, count, concurrency)
            registry.violations.clear()
            done += count
            print(f"  {engine}: {done} sequences, {len(problems)} violations", flush=True)
    delivered = sum(1 for sent in registry.sent.values() if sent.seen)
    print(f"engine {engine} ({backends} backend(s) {' '.join(extra)}): {sequences} sequences, "
          f"{len(registry.sent)} requests sent, {delivered} received by the backend(s), "
          f"{oracle.connections} connections to the first, {len(problems)} violations "
          f"({time.monotonic() - started:.0f} s, seed {seed})")
    for problem in problems[:50]:
        print("  ", problem)
    return len(problems)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--engines", default="c,python")
    parser.add_argument("--backends", type=int, default=1, help="oracle backends behind fastlb (1)")
    parser.add_argument("--fastlb-args", default="", help="more fastlb flags, e.g. '--retry-on all-retryable-errors'")
    args = parser.parse_args()
    total = 0
    for engine in args.engines.split(","):
        total += asyncio.run(one_engine(engine, args.seed, args.sequences, args.concurrency,
                                           args.backends, tuple(args.fastlb_args.split())))
    print(f"total violations: {total}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
