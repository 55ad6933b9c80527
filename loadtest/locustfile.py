"""Payment-style load against a balancer in front of loadtest/payment_app.py.

Scenarios (tags, to run one alone with `--tags`):
  browse     GET /products and /products/ID
  login      POST /login: a session the answering backend alone knows (sticky from then on)
  checkout   POST /checkout with a fresh order id: 201 once; a 409 means it was applied twice
  account    GET /account with the session
A user logs in first, then mixes them with think times. Every response after the login must come
from the backend that holds the session (X-Backend); anything else is recorded as a failure,
so a run with 0 failures is a run where every session stayed on its backend.

THINK_MIN / THINK_MAX (environment) set the seconds between a user's requests (0.05 / 0.3).
Add loadtest/step_shape.py (`-f loadtest/locustfile.py,loadtest/step_shape.py`) to find the peak
sustainable rate; without it, --users/--spawn-rate/--run-time drive the run.
"""
import itertools
import json
import os
import time
import uuid

from locust import HttpUser, between, events, tag, task

THINK = (float(os.environ.get("THINK_MIN", "0.05")), float(os.environ.get("THINK_MAX", "0.3")))
_user_numbers = itertools.count()


class PaymentUser(HttpUser):
    wait_time = between(*THINK)

    def on_start(self):
        self.number = next(_user_numbers)
        self.backend = None
        self.login()

    def call(self, method, path, name=None, expect=(200,), **kwargs):
        """One request; a wrong status, or an answer from another backend than the session's, fails it."""
        with self.client.request(method, path, name=name or path, catch_response=True, **kwargs) as response:
            served_by = response.headers.get("X-Backend")
            if response.status_code not in expect:
                response.failure(f"status {response.status_code}: {response.text[:80]}")
            elif self.backend is not None and served_by != self.backend:
                response.failure(f"session moved from {self.backend} to {served_by}")
            else:
                response.success()
            return response

    @tag("login")
    @task(1)
    def login(self):
        self.client.cookies.clear()  # a new session, routed by the balancer afresh
        self.backend = None
        response = self.call("POST", "/login", data=json.dumps({"user": f"user-{self.number}"}))
        if response.status_code == 200:
            self.backend = response.headers.get("X-Backend")

    @tag("browse")
    @task(6)
    def browse(self):
        self.call("GET", "/products")
        self.call("GET", f"/products/{self.number % 50}", name="/products/[id]")

    @tag("account")
    @task(2)
    def account(self):
        self.call("GET", "/account")

    @tag("checkout")
    @task(2)
    def checkout(self):
        order = str(uuid.uuid4())
        self.call("POST", "/checkout", expect=(201,), data=json.dumps({"order": order, "amount": 1999}),
                  headers={"Content-Type": "application/json", "Idempotency-Key": order})


@events.quitting.add_listener
def _report(environment, **_kwargs):
    total = environment.stats.total
    print(f"LOADTEST totals: {total.num_requests} requests, {total.num_failures} failures, "
          f"p50 {total.get_response_time_percentile(0.5):.0f} ms, "
          f"p99 {total.get_response_time_percentile(0.99):.0f} ms, at {time.strftime('%H:%M:%S')}", flush=True)
