"""An HTTP/2 (h2c, prior knowledge) test backend on the `h2` package, served by a thread of the test process:
what a grpcio server never sends (tests/test_http2_interim_trailers.py).

Paths (every request's body is read to its end first):
  /trailers      200 with content-length 5, `hello`, then the trailers x-checksum: h2-sum, grpc-status: 0
  /early-hints   103 (link: </style.css>; rel=preload), then 200 with content-length, `hinted`
"""
from __future__ import annotations

import socket
import threading

import h2.config
import h2.connection
import h2.events

EARLY_HINTS_LINK = "</style.css>; rel=preload"


class H2Backend:
    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.paths: list[str] = []                  # the requests received, in order
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return                              # closed: the test is over
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        paths: dict[int, str] = {}
        with sock:
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        paths[event.stream_id] = dict(event.headers)[":path"]
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if isinstance(event, (h2.events.RequestReceived, h2.events.DataReceived)) and \
                            event.stream_ended is not None:
                        self._respond(conn, event.stream_id, paths[event.stream_id])
                sock.sendall(conn.data_to_send())

    def _respond(self, conn: h2.connection.H2Connection, stream_id: int, path: str) -> None:
        self.paths.append(path)
        if path == "/trailers":
            conn.send_headers(stream_id, [(":status", "200"), ("content-length", "5"),
                                          ("content-type", "text/plain")])
            conn.send_data(stream_id, b"hello")
            conn.send_headers(stream_id, [("x-checksum", "h2-sum"), ("grpc-status", "0")], end_stream=True)
        elif path == "/early-hints":
            conn.send_headers(stream_id, [(":status", "103"), ("link", EARLY_HINTS_LINK)])
            conn.send_headers(stream_id, [(":status", "200"), ("content-length", "6")])
            conn.send_data(stream_id, b"hinted", end_stream=True)
        else:
            conn.send_headers(stream_id, [(":status", "404"), ("content-length", "0")], end_stream=True)

    def close(self) -> None:
        self.listener.close()

    def __enter__(self) -> "H2Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
