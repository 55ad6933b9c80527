"""What one machine allows: workers per CPU, and the connections and queue one worker can hold under
its open-files limit."""
from __future__ import annotations

import os

# Open files a worker needs besides relayed connections: listeners, the event loop's own fds, logging,
# stdio, a margin for connects in flight when the limit is reached.
RESERVED_FDS = 64

# Workers beyond this many per CPU only add memory and context switches (each is a full event loop);
# `allow_many_workers = true` (--allow-many-workers true) allows more, for an operator who means it.
MAX_WORKERS_PER_CPU = 4


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) or 1


def open_files_limit() -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE, after raising soft to hard: a relay needs every fd it may have."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


# The wait queue's share of the open files a worker has for connections: a queued client holds 1, a
# relayed connection 2, so a queue sized alone (its 1024 default under a limit of 1024) would leave no
# room for the connections it waits for.
QUEUE_FD_SHARE = 5                 # the queue takes at most 1/5 of the budget
# A default maxconn below this is worth a WARNING: the open-files limit, not the machine, is the bound.
SMALL_MAXCONN = 1000


def connection_limits(fd_limit: int, maxconn: int | None, queue_size: int) -> tuple[int, int, int]:
    """(maxconn, queue size, capacity) one worker can hold under fd_limit open files: each relayed
    connection takes 2 fds (client + backend), each queued client 1, RESERVED_FDS stay for listeners and
    the loop. The queue is sized first, capped at 1/QUEUE_FD_SHARE of the budget; the connections get the
    rest (`capacity`): maxconn is that when not given, else the smaller of the two."""
    budget = max(0, fd_limit - RESERVED_FDS)
    queue = min(queue_size, budget // QUEUE_FD_SHARE)
    capacity = max(1, (budget - queue) // 2)
    return (capacity if maxconn is None else min(maxconn, capacity)), queue, capacity
