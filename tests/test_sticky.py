"""Session persistence end to end: real fastlb processes, real HTTP backends, real redis-server and memcached.

One fastlb config serves three pools over the same backends, one per kind of persistence (`/c/` signed
insert cookie, `/l/` learned JSESSIONID, `/s/` source address), so each store test needs two balancers
only. Client source addresses vary over 127.0.0.0/8 for the source-IP stick table.
"""
import hashlib
import socket
import textwrap

import pytest

from http_client import Client, requests_seen
from procs import free_port, wait_until
from stores import memcached_get, redis_get, start_memcached, start_redis

SECRET = "0123456789abcdef-test-secret"
NAMES = ("a", "b", "c")


def client(port: int, source: str | None = None) -> Client:
    """A Client whose connection comes from `source` (an address in 127.0.0.0/8)."""
    c = Client.__new__(Client)
    c.sock = socket.create_connection(("127.0.0.1", port), timeout=5,
                                      source_address=(source, 0) if source else None)
    c.leftover = b""
    c.timeout = 5.0
    return c


def get(port: int, path: str, cookie: str | None = None, source: str | None = None):
    with client(port, source) as c:
        response = c.request("GET", path, {"Cookie": cookie} if cookie else None)
    assert response.status == 200, (path, response.status, response.body)
    return response


def set_cookie(response, name: str) -> str | None:
    for value in response.header_all("Set-Cookie"):
        if value.startswith(name + "="):
            return value.split(";")[0][len(name) + 1:]
    return None


def store_key(namespace: str, key: bytes) -> bytes:
    return b"fastlb:" + namespace.encode() + b":" + hashlib.blake2b(key, digest_size=16).hexdigest().encode()


def write_config(tmp_path, ports: dict, store: str) -> str:
    backends = ", ".join(f'"127.0.0.1:{ports[n]}"' for n in NAMES)
    secret = tmp_path / "cookie.key"
    secret.write_text(SECRET)
    path = tmp_path / "lb.toml"
    path.write_text(textwrap.dedent(f"""\
        store = "{store}"
        cookie_secret_file = "{secret}"
        stick_ttl = "5m"
        default_pool = "c"

        [[pool]]
        name = "c"
        backend = [{backends}]
        sticky = "cookie:SRV,httponly,samesite=lax"

        [[pool]]
        name = "l"
        backend = [{backends}]
        sticky = "learn:JSESSIONID"

        [[pool]]
        name = "s"
        backend = [{backends}]
        sticky = "source"

        [[route]]
        pool = "l"
        path_prefix = "/l/"

        [[route]]
        pool = "s"
        path_prefix = "/s/"
        """))
    return str(path)


def two_balancers(procs, config: str):
    ports = []
    balancers = []
    for _ in range(2):
        port = free_port()
        balancers.append(procs.fastlb("--config", config, "--bind", f"127.0.0.1:{port}"))
        ports.append(port)
    return ports, balancers


def sessions_are_shared(procs, tmp_path, store_url: str, store_has) -> None:
    _, backend_ports = procs.http_backends(*NAMES)
    (lb1, lb2), _ = two_balancers(procs, write_config(tmp_path, backend_ports, store_url))

    # Signed insert cookie: set by lb1, honoured by lb2 (no store involved: the cookie is the state).
    for i in range(3):
        first = get(lb1, f"/c/{i}")
        cookie = set_cookie(first, "SRV")
        assert cookie and "HttpOnly" in first.header("Set-Cookie") and "SameSite=Lax" in first.header("Set-Cookie")
        assert {get(lb2, f"/c/{i}/{n}", f"SRV={cookie}").header("X-Backend") for n in range(4)} == \
            {first.header("X-Backend")}

    # Learned session id: the backend behind lb1 sets JSESSIONID; lb2 finds it in the shared store.
    for i in range(3):
        session = f"sess-{i}-{tmp_path.name}"
        learned = get(lb1, f"/l/setcookie?name=JSESSIONID&value={session}").header("X-Backend")
        wait_until(lambda: store_has(store_key("l:learn:JSESSIONID", session.encode())),
                   what=f"session {session} in the store")
        answers = {get(lb2, f"/l/{n}", f"JSESSIONID={session}").header("X-Backend") for n in range(4)}
        assert answers == {learned}, (session, learned, answers)

    # Source address: first request through lb1 pins the address; lb2 sends it to the same backend.
    for i in range(3):
        source = f"127.0.{7 + i}.{tmp_path.name.__len__() % 200 + 10}"
        pinned = get(lb1, "/s/first", source=source).header("X-Backend")
        wait_until(lambda: store_has(store_key("s:source:", source.encode())),
                   what=f"source {source} in the store")
        answers = {get(lb2, f"/s/{n}", source=source).header("X-Backend") for n in range(4)}
        assert answers == {pinned}, (source, pinned, answers)


def test_sessions_shared_through_redis(procs, tmp_path):
    _, redis_port = start_redis(procs, str(tmp_path))
    sessions_are_shared(procs, tmp_path, f"redis://127.0.0.1:{redis_port}/0",
                        lambda key: redis_get(redis_port, key) is not None)


def test_sessions_shared_through_memcached(procs, tmp_path):
    _, memcached_port = start_memcached(procs)
    sessions_are_shared(procs, tmp_path, f"memcached://127.0.0.1:{memcached_port}",
                        lambda key: memcached_get(memcached_port, key) is not None)


# ---- cookies --------------------------------------------------------------------------------------

def start_cookie_balancer(procs, tmp_path, sticky="cookie:SRV", backend_procs=False, *extra):
    """fastlb with --sticky in front of backends a, b, c (each its own process if backend_procs)."""
    if backend_procs:
        started = {name: procs.http_backends(name) for name in NAMES}
        ports = {name: started[name][1][name] for name in NAMES}
        processes = {name: started[name][0] for name in NAMES}
    else:
        proc, ports = procs.http_backends(*NAMES)
        processes = {name: proc for name in NAMES}
    secret = tmp_path / "cookie.key"
    secret.write_text(SECRET)
    port = free_port()
    args = ["--bind", f"127.0.0.1:{port}", "--sticky", sticky, "--cookie-secret-file", str(secret), *extra]
    for name in NAMES:
        args += ["--backend", f"127.0.0.1:{ports[name]}"]
    procs.fastlb(*args)
    return port, processes


def test_forged_or_tampered_cookies_are_ignored(procs, tmp_path):
    port, _ = start_cookie_balancer(procs, tmp_path)
    genuine = {}
    for i in range(6):
        response = get(port, f"/{i}")
        genuine[response.header("X-Backend")] = set_cookie(response, "SRV")
    assert set(genuine) == set(NAMES)
    ident_a, first, last, signature = genuine["a"].split(".")
    ident_b = genuine["b"].split(".")[0]
    from fastlb.sticky import SIGNATURE_BYTES  # noqa: F401  (the format under test)
    forged = [
        f"{ident_b}.{first}.{last}.{signature}",               # another backend's id under a's signature
        f"{ident_a}.{first}.{int(last, 16) + 1:x}.{signature}",  # a changed timestamp
        f"{ident_a}.{first}.{last}.{signature[:-2]}AA",         # a changed signature
        "127.0.0.1:80",                                         # an address
        "garbage",
    ]
    for cookie in forged:
        answers = set()
        for n in range(6):
            response = get(port, f"/forged/{n}", f"SRV={cookie}")
            answers.add(response.header("X-Backend"))
            fresh = set_cookie(response, "SRV")
            assert fresh and fresh != cookie                     # a new, genuine cookie replaces it
        assert answers == set(NAMES), (cookie, answers)          # balanced as if no cookie, never routed
    # The genuine ones still route.
    for name, cookie in genuine.items():
        assert {get(port, f"/ok/{n}", f"SRV={cookie}").header("X-Backend") for n in range(3)} == {name}


def test_prefix_cookie_is_stripped_before_the_backend(procs, tmp_path):
    port, processes = start_cookie_balancer(procs, tmp_path, "prefix:JSESSIONID")
    backend_log = processes["a"]
    response = get(port, "/setcookie?name=JSESSIONID&value=app42")
    served = response.header("X-Backend")
    prefixed = set_cookie(response, "JSESSIONID")
    assert prefixed.endswith("~app42") and "127.0.0.1" not in prefixed
    start = len(backend_log.lines)
    for n in range(4):
        assert get(port, f"/p/{n}", f"other=1; JSESSIONID={prefixed}").header("X-Backend") == served
    seen = requests_seen(backend_log, start, at_least=4)
    cookies = {v for r in seen for k, v in r["headers"] if k.lower() == "cookie"}
    assert cookies == {"other=1; JSESSIONID=app42"}, cookies


def test_pinned_backend_killed_moves_once_and_stays(procs, tmp_path):
    port, processes = start_cookie_balancer(procs, tmp_path, "cookie:SRV,indirect", True)
    response = get(port, "/start")
    pinned, cookie = response.header("X-Backend"), set_cookie(response, "SRV")
    assert {get(port, f"/x/{n}", f"SRV={cookie}").header("X-Backend") for n in range(3)} == {pinned}
    processes[pinned].kill()
    moved = get(port, "/after", f"SRV={cookie}")
    new_backend, new_cookie = moved.header("X-Backend"), set_cookie(moved, "SRV")
    assert new_backend != pinned and new_cookie and new_cookie != cookie
    answers = [get(port, f"/y/{n}", f"SRV={new_cookie}") for n in range(8)]
    assert {r.header("X-Backend") for r in answers} == {new_backend}
    assert all(set_cookie(r, "SRV") is None for r in answers)   # indirect: a valid cookie is not re-sent


def test_indirect_replaces_the_backends_own_cookie_and_keeps_its_others(procs, tmp_path):
    # The response fast path stays on with cookie rules; a backend Set-Cookie sends the response to the
    # slow path, which drops a backend's cookie of our name (indirect) and keeps every other one.
    port, _ = start_cookie_balancer(procs, tmp_path, "cookie:SRV,indirect")
    plain = get(port, "/plain")
    served, cookie = plain.header("X-Backend"), set_cookie(plain, "SRV")
    assert cookie
    own = get(port, "/setcookie?name=SRV&value=from-backend")
    assert set_cookie(own, "SRV") not in (None, "from-backend")      # fastlb's, for the backend that answered
    app = get(port, "/setcookie?name=app&value=42", f"SRV={cookie}")
    assert app.header("X-Backend") == served and set_cookie(app, "app") == "42"
    assert set_cookie(app, "SRV") is None                              # indirect: a valid cookie is not re-sent


def test_source_stick_table_in_tcp_mode(procs, tcp_relay, tmp_path):
    from procs import backend_name
    proc, ports = procs.backends(*NAMES)
    port = free_port()
    args = ["--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--sticky", "source"]
    for name in NAMES:
        args += ["--backend", f"127.0.0.1:{ports[name]}"]
    procs.fastlb(*args)
    firsts = {}
    for i in range(6):
        source = f"127.0.3.{i + 1}"
        firsts[source] = backend_name(port, source)
    assert len(set(firsts.values())) > 1                 # new addresses are balanced
    for source, name in firsts.items():
        assert {backend_name(port, source) for _ in range(3)} == {name}


def test_memory_store_is_shared_by_the_workers_of_one_balancer(procs):
    from procs import backend_name
    _, ports = procs.backends(*NAMES)
    port = free_port()
    args = ["--mode", "tcp", "--bind", f"127.0.0.1:{port}", "--sticky", "source", "--store", "memory",
            "--workers", "2"]
    for name in NAMES:
        args += ["--backend", f"127.0.0.1:{ports[name]}"]
    procs.fastlb(*args)
    # SO_REUSEPORT spreads each source's connections over both workers (by port hash): a source keeps
    # one backend only if the worker that pinned it told the other, through the master. Two first
    # connections may race on both workers at once; the mapping settles on one of them.
    sources = [f"127.0.4.{i + 1}" for i in range(6)]

    def settled(source):
        names = [backend_name(port, source) for _ in range(10)]
        return len(set(names)) == 1 and names[0]

    pinned = {source: wait_until(lambda: settled(source), what=f"{source} settling on a backend")
              for source in sources}
    assert len(set(pinned.values())) > 1                 # new addresses are balanced
    for source, name in pinned.items():
        assert {backend_name(port, source) for _ in range(40)} == {name}, source


# ---- the store going away -------------------------------------------------------------------------

def test_redis_stopped_mid_test_fails_no_request_and_sharing_resumes(procs, tmp_path):
    redis_proc, redis_port = start_redis(procs, str(tmp_path))
    _, backend_ports = procs.http_backends(*NAMES)
    (lb1, lb2), (proc1, proc2) = two_balancers(
        procs, write_config(tmp_path, backend_ports, f"redis://127.0.0.1:{redis_port}/0"))

    def session_through(lb, session):
        return get(lb, f"/l/setcookie?name=JSESSIONID&value={session}").header("X-Backend")

    learned = {f"before-{i}": session_through(lb1, f"before-{i}") for i in range(3)}
    redis_proc.kill()
    # Requests carry on through both balancers: known sessions from lb1's local table, new ones too.
    failures = 0
    for n in range(30):
        session = f"before-{n % 3}"
        for lb in (lb1, lb2):
            try:
                response = get(lb, f"/l/{n}", f"JSESSIONID={session}")
            except (AssertionError, OSError):
                failures += 1
                continue
            if lb == lb1:
                assert response.header("X-Backend") == learned[session]
        learned[f"during-{n}"] = session_through(lb1, f"during-{n}")
    assert failures == 0
    for proc in (proc1,):
        proc.wait_for_line(r"session store redis unreachable")
    assert sum("unreachable" in line for line in proc1.lines) == 1      # logged once, not per request

    start_redis(procs, str(tmp_path), redis_port)
    proc1.wait_for_line(r"session store redis reachable again", timeout=10)
    proc2.wait_for_line(r"session store redis reachable again", timeout=10)
    # New sessions are shared again, and so are those made while the store was down (flushed on return).
    session = "after-0"
    learned[session] = session_through(lb1, session)
    for name in (session, "during-29"):
        wait_until(lambda: redis_get(redis_port, store_key("l:learn:JSESSIONID", name.encode())),
                   what=f"{name} in redis")
        assert {get(lb2, f"/l/z{n}", f"JSESSIONID={name}").header("X-Backend") for n in range(3)} == \
            {learned[name]}


# ---- units ----------------------------------------------------------------------------------------

def test_stick_table_expires_and_evicts_least_recently_used():
    from fastlb.sticky import StickTable
    table = StickTable(size=2, ttl=10.0)
    table.put(b"x", b"A", now=0.0)
    table.put(b"y", b"B", now=1.0)
    assert table.get(b"x", now=2.0)[0] == b"A"          # x is now the most recently used
    table.put(b"z", b"C", now=3.0)
    assert table.get(b"y", now=3.0) is None and len(table) == 2
    assert table.get(b"x", now=9.9) is not None and table.get(b"x", now=10.0) is None


def test_cookie_maxidle_and_maxlife():
    from fastlb.config import parse_sticky
    from fastlb.sticky import SessionStore, Sticky

    class FakePool:
        backends = [type("B", (), {"address": "10.0.0.1:80"})(), type("B", (), {"address": "10.0.0.2:80"})()]

    now = [1000.0]
    sticky = Sticky(parse_sticky("cookie:SRV,maxidle=60,maxlife=300"), "p", FakePool(), SessionStore(None, 60, 10),
                    b"k" * 16, clock=lambda: now[0])
    backend = FakePool.backends[1]
    value = sticky.make_cookie(backend)
    assert b"10.0.0" not in value
    assert sticky.verify(value) is backend
    now[0] += 61
    assert sticky.verify(value) is None                  # idle too long
    now[0] = 1000.0 + 50
    refreshed = sticky.make_cookie(backend, first=1000)
    now[0] = 1000.0 + 301
    assert sticky.verify(refreshed) is None              # too old, however fresh the last visit
    other = Sticky(parse_sticky("cookie:SRV"), "p", FakePool(), SessionStore(None, 60, 10), b"j" * 16)
    assert other.verify(value) is None                   # another secret


@pytest.mark.parametrize("text, error", [
    ("cookie", "expected cookie:NAME"), ("prefix:a b", "expected"), ("source:x", "no name"),
    ("learn:SID,httponly", "cookie: only"), ("cookie:S,maxidle=forever", "maxidle"), ("stick", "expected"),
])
def test_sticky_flag_errors(text, error):
    from fastlb.config import parse_sticky
    with pytest.raises(ValueError, match=error):
        parse_sticky(text)
