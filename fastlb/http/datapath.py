"""The HTTP data path of one worker (the `DataPath` of fastlb/server/datapath.py): its binds served by the
C engine where it can (fastlb/http/fast.py) and by the Python path's protocols (fastlb/http/protocol.py)
on the others; HTTP/2 connections (fastlb/http2/) are the Python path's too. It builds the state they
share (fastlb/http/runtime.py's HttpRuntime) and is the one module that knows every part of the path."""
from __future__ import annotations

import asyncio
import logging

from fastlb.config import Config
from fastlb.http import fast
from fastlb.http.protocol import ClientConnection
from fastlb.http.routing import Router
from fastlb.http.runtime import HttpRuntime
from fastlb.http.upstream import BackendConnection
from fastlb.http2 import available as h2_available

log = logging.getLogger("fastlb")


class HttpPath:
    name = "http"

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, router: Router,
                 observer=None, gate=None) -> None:
        h2 = None
        if config.h2 and h2_available():
            from fastlb.http2.connection import H2Settings     # (only where libnghttp2 is built)
            h2 = H2Settings(config)
        self.runtime = HttpRuntime(config, loop, router, BackendConnection, observer, h2)
        self.sweep_interval = self.runtime.sweep_interval
        self.handshake_timeout = config.connect_timeout     # a TLS bind's, in the engine as in uvloop
        self.gate = gate           # the worker's AcceptGate (fastlb/l4.py): its servers and the engine's rest at its limit
        self.binds = []            # (bind, listening socket, ServerTLS or None): add_bind
        self.served = []           # the gate's entries for the Python path's binds
        self.accepted = 0          # client connections the Python path accepted (the engine counts its own)

    # ---- the data path (fastlb/server/datapath.py) -------------------------------------------------

    def serves(self, bind, tls) -> bool:
        return True                     # every bind of an HTTP-mode worker

    def add_bind(self, bind, sock, tls) -> None:
        self.binds.append((bind, sock, tls))

    async def start(self) -> None:
        for bind, sock, tls in self.binds:
            if self.serve_with_engine(bind, sock, tls):
                # The engine accepts on its own duplicate: this copy goes, so that stopping the engine
                # (drain) stops listening (a copy left open would queue connections nobody accepts).
                sock.close()
                continue
            self.served.append(await self.gate.serve(self.protocol_factory(bind), sock, tls))
        if self.runtime.fast is not None:
            self.runtime.fast.start()

    def stop_accepting(self) -> None:
        if self.runtime.fast is not None:
            self.runtime.fast.engine.stop_listening()
        self.gate.stop_serving(self.served)
        self.served = []

    @property
    def live(self) -> int:
        """Client connections open (the Python path's and the engine's)."""
        runtime = self.runtime
        return len(runtime.connections) + (runtime.fast.live if runtime.fast is not None else 0)

    @property
    def clients_accepted(self) -> int:
        """Client connections accepted since the worker started (the Python path's and the engine's)."""
        engine = self.runtime.fast
        return self.accepted + (engine.engine.accepted if engine is not None else 0)

    @property
    def engine_counts(self) -> dict | None:
        """The C engine's counters (requests it served, what it handed over and why), when it serves."""
        engine = self.runtime.fast
        return engine.counts() if engine is not None else None

    def start_draining(self, on_idle) -> None:
        """Responses say Connection: close; idle keep-alive clients are closed (by the sweep). The Python
        path's connections and the engine's each call on_idle when their last one ends."""
        runtime = self.runtime
        runtime.draining = True
        runtime.on_idle = on_idle
        if runtime.fast is not None:
            runtime.fast.engine.on_idle = on_idle
            runtime.fast.engine.draining = True

    def close_all(self) -> None:
        for client in list(self.runtime.connections):
            client.close()
        if self.runtime.fast is not None:
            self.runtime.fast.engine.close_all()

    def sweep(self, now: float) -> None:
        self.runtime.sweep(now)

    def stop(self) -> None:
        runtime = self.runtime
        if runtime.fast is not None:
            runtime.fast.stop()
        for route in runtime.router.pools.values():
            for backend in route.pool.backends:
                while backend.idle:
                    backend.idle.pop().transport.close()
            if route.name != "default":
                route.pool.close()          # the default pool is the worker's, closed by it

    def serve_with_engine(self, bind, sock, tls=None) -> bool:
        """The C engine accepts and serves the bind where it can (fastlb/http/fast.py says when; a TLS
        bind, tls: its fastlb.tls.ServerTLS, with its handshakes in C within --connect-timeout, as uvloop's
        on the Python path); False: the bind needs a uvloop server with `protocol_factory`. The start log
        says which, and why. The engine's listeners follow the worker's AcceptGate."""
        runtime = self.runtime
        reason = fast.why_not(runtime, bind, tls)
        if reason is not None:
            log.info("%s: HTTP engine python (%s)", bind.address, reason)
            return False
        if runtime.fast is None:
            runtime.fast = fast.FastPath(runtime, bind)
            for route in runtime.router.pools.values():
                route.pool.idle_keeper = runtime.fast.engine
            gate = self.gate
            if gate is not None:
                runtime.fast.gate = gate
                runtime.fast.engine.max_clients = gate.limit
                gate.engines.append(runtime.fast.engine)
        runtime.fast.listen(sock, bind, tls, self.handshake_timeout)
        log.info("%s: HTTP engine c", bind.address)
        return True

    def protocol_factory(self, bind):
        runtime = self.runtime

        def accepted():
            self.accepted += 1              # per connection uvloop accepts (not for adopted ones)
            return ClientConnection(runtime, bind)
        return accepted
