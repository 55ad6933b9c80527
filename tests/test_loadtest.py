"""A short, bounded Locust run of the payment scenarios through fastlb with sticky cookies:
0 failures (a session answered by another backend would be a 401 or an X-Backend mismatch,
a duplicated checkout a 409), and each backend's own counters agree."""
from __future__ import annotations

import json
import re
import sys
import urllib.request

from procs import REPO, free_port

LOADTEST = REPO / "loadtest"


def backend_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as response:
        return json.loads(response.read())


def test_locust_payment_run_has_no_failures_and_sessions_stay_put(procs, tmp_path):
    ports = [free_port() for _ in range(3)]
    app = procs.start([sys.executable, str(LOADTEST / "payment_app.py"),
                       *(f"app{i + 1}:{port}" for i, port in enumerate(ports))], "payment_app")
    app.wait_for_line(r"^ready$")
    secret = tmp_path / "cookie-secret"
    secret.write_text("0123456789abcdef" * 4)
    port = free_port()
    procs.fastlb("--mode", "http", "--bind", f"127.0.0.1:{port}", "--sticky", "cookie:SRV",
                 "--cookie-secret-file", str(secret), *(a for p in ports for a in ("--backend", f"127.0.0.1:{p}")))

    locust = procs.start([sys.executable, "-m", "locust", "-f", str(LOADTEST / "locustfile.py"), "--headless",
                          "--host", f"http://127.0.0.1:{port}", "--users", "20", "--spawn-rate", "20",
                          "--run-time", "8s", "--stop-timeout", "5", "--only-summary",
                          "--exit-code-on-error", "1"], "locust")
    totals = locust.wait_for_line(r"LOADTEST totals: (\d+) requests, (\d+) failures", timeout=60)
    assert locust.wait_exit(timeout=30) == 0, locust.output
    requests, failures = int(totals.group(1)), int(totals.group(2))
    assert requests > 200 and failures == 0, locust.output

    stats = [backend_stats(p) for p in ports]
    assert sum(s["duplicates"] for s in stats) == 0
    assert sum(s["unknown_session"] for s in stats) == 0        # no session reached a stranger
    assert sum(1 for s in stats if s["logins"]) >= 2            # sessions were spread, then stayed
    assert sum(s["checkouts"] for s in stats) > 0
    assert re.search(r"LOADTEST totals", locust.output)
