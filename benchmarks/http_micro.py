"""User-space CPU per proxied HTTP request, without sockets or the kernel: the compiled (or, when not
built, interpreted) protocols with fake transports, one keep-alive client and two parked backend
connections; per iteration one request in from the client and one nginx-like response in from the
backend. A quiet, repeatable measure of fastlb's own per-request work (the proxy bench's user time also
includes uvloop's).

    taskset -c 1 python3 benchmarks/http_micro.py [ITERATIONS] [slow]   # slow: without the response fast path
    STICKY=cookie:SRV taskset -c 1 python3 benchmarks/http_micro.py    # with a sticky rule (any --sticky)

With STICKY, every request carries the cookie a first response set (a valid insert cookie, as a returning
client sends it) and a JSESSIONID, like benchmarks/sticky_cost.py.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import uvloop  # noqa: E402

from fastlb.config import BackendSpec, BindSpec, Config, parse_sticky  # noqa: E402
from fastlb.http.datapath import HttpPath  # noqa: E402
from fastlb.http.runtime import build_router  # noqa: E402


class FakeTransport:
    def __init__(self): self.out = 0; self.closing = False; self.last = b""; self.reading = True
    def write(self, data): self.out += len(data); self.last = data
    def is_closing(self): return self.closing
    def get_extra_info(self, name, default=None): return ("127.0.0.1", 5555) if name == "peername" else default
    def is_reading(self): return self.reading
    def pause_reading(self): self.reading = False
    def resume_reading(self): self.reading = True
    def close(self): self.closing = True
    def abort(self): self.closing = True



loop = uvloop.new_event_loop()
config = Config(binds=[BindSpec("127.0.0.1", 1)], backends=[BackendSpec("127.0.0.1", 2), BackendSpec("127.0.0.1", 3)])
STICKY = os.environ.get("STICKY")
store = None
if STICKY:
    from fastlb.sticky import SessionStore
    config.sticky = parse_sticky(STICKY)
    store = SessionStore(loop, config.stick_ttl, config.stick_table_size)
path = HttpPath(config, loop, build_router(config, loop, 10000, store=store))
rt = path.runtime
pool = rt.router.default.pool
ups = []
for b in pool.backends:
    u = rt.backend_factory(); t = FakeTransport(); u.connection_made(t); u.backend = b
    rt.park(u, b); ups.append(u)
client = path.protocol_factory(config.binds[0])()
ct = FakeTransport(); client.connection_made(ct)
REQ = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
RESP = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 21 Nov 2026 02:00:00 GMT\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: 72\r\nConnection: keep-alive\r\n\r\n" + b"x" * 72)
if STICKY:
    client.data_received(REQ)
    client.queue[0].upstream.data_received(RESP)
    line = next((l for l in ct.last.split(b"\r\n") if l.startswith(b"Set-Cookie: SRV=")), b"Set-Cookie: SRV=x")
    cookie = line.split(b": ", 1)[1].split(b";")[0]
    REQ = REQ[:-2] + b"Cookie: " + cookie + b"; JSESSIONID=bench-session-1\r\n\r\n"
if len(sys.argv) > 2: rt.settings.fast_responses = False
N = int(sys.argv[1]) if len(sys.argv) > 1 else 200000


def run(n):
    for i in range(n):
        client.data_received(REQ)
        up = client.queue[0].upstream
        up.data_received(RESP)
run(1000)
assert not client.queue and ct.out > 0, (client.queue, ct.out)
t0 = time.process_time(); run(N); t1 = time.process_time()
print(f"{(t1 - t0) / N * 1e6:.2f} us/request user-space (fast_responses={rt.settings.fast_responses}, "
      f"sticky={STICKY or 'none'})")
