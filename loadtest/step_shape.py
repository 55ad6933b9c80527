"""A load shape that finds the peak sustainable rate: used with the payment scenarios as
`locust -f loadtest/locustfile.py,loadtest/step_shape.py --headless ...` (loadtest/run.py does it).

Knobs (environment): STEP_USERS (10) users added every STEP_SECONDS (10) up to MAX_USERS (400);
a step whose p99 exceeds P99_LIMIT_MS (250) or whose error rate exceeds ERROR_LIMIT (0.01) ends the
run, as do TIME_LIMIT seconds (120). The last step within limits is the peak; it is printed as a
`LOADTEST {...}` JSON line and written to LOADTEST_SUMMARY=FILE when set.
"""
import json
import os

from locust import LoadTestShape


class StepUntilBreaking(LoadTestShape):
    """Adds STEP_USERS users every STEP_SECONDS until a step's p99 or error rate crosses its limit
    (or MAX_USERS / TIME_LIMIT is reached); the last step within limits is the peak sustainable rate."""

    step_users = int(os.environ.get("STEP_USERS", "10"))
    step_seconds = float(os.environ.get("STEP_SECONDS", "10"))
    max_users = int(os.environ.get("MAX_USERS", "400"))
    p99_limit_ms = float(os.environ.get("P99_LIMIT_MS", "250"))
    error_limit = float(os.environ.get("ERROR_LIMIT", "0.01"))
    time_limit = float(os.environ.get("TIME_LIMIT", "120"))

    def __init__(self):
        super().__init__()
        self.step = 0
        self.step_started = None
        self.step_base = (0, 0)
        self.peak = None
        self.stop_reason = None

    def tick(self):
        now = self.get_run_time()
        step = int(now // self.step_seconds)
        if step != self.step:
            if not self._step_within_limits():
                return self._finish()
            self.step = step
        users = (self.step + 1) * self.step_users
        if users > self.max_users:
            self.stop_reason = f"reached MAX_USERS={self.max_users}"
            return self._finish()
        if now > self.time_limit:
            self.stop_reason = f"reached TIME_LIMIT={self.time_limit:g}s"
            return self._finish()
        return users, self.step_users

    def _step_within_limits(self):
        """Judge the step that just ended on its own requests (not the run's totals)."""
        total = self.runner.stats.total
        requests, failures = total.num_requests - self.step_base[0], total.num_failures - self.step_base[1]
        self.step_base = (total.num_requests, total.num_failures)
        if requests == 0:
            return True
        p99 = total.get_current_response_time_percentile(0.99) or 0
        p50 = total.get_current_response_time_percentile(0.50) or 0
        errors = failures / requests
        users = (self.step + 1) * self.step_users
        rate = requests / self.step_seconds
        if p99 > self.p99_limit_ms or errors > self.error_limit:
            self.stop_reason = (f"step at {users} users crossed a limit: p99 {p99:.0f} ms "
                                f"(limit {self.p99_limit_ms:g}), errors {errors:.2%} (limit {self.error_limit:.0%})")
            return False
        self.peak = {"users": users, "rps": round(rate, 1), "p50_ms": p50, "p99_ms": p99,
                     "errors": round(errors, 4), "requests": requests}
        return True

    def _finish(self):
        summary = {"peak": self.peak, "stopped": self.stop_reason}
        print("LOADTEST " + json.dumps(summary), flush=True)
        path = os.environ.get("LOADTEST_SUMMARY")
        if path:
            with open(path, "w") as out:
                json.dump(summary, out)
        return None
