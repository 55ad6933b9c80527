"""A gRPC test backend (grpcio, generic handlers, no protoc): `python grpc_backend.py NAME:PORT [--tls CERT KEY]`.

Messages are raw bytes (identity serializers). Methods of the service `test.Echo`:
- Unary: answers `NAME:` + the request; sends the initial metadata `x-backend: NAME` and the trailing
  metadata `x-trailer: NAME`, and echoes the client's `x-echo` metadata in the trailers;
- ServerStream: the request is a count N: N messages `NAME:i`;
- Bidi: each request answered `NAME:` + it, as it comes;
- Fail: aborts with INVALID_ARGUMENT, the message `bad: ` + the request, trailer `x-why: refused`;
- Sleep: sleeps the request's seconds (a float), then answers `NAME:slept`;
- Deadline: answers the grpc-timeout the call arrived with (what fastlb passed on).
And `grpc.health.v1.Health/Check`, SERVING (protobuf `08 01`) unless the file named by `--health-file`
says NOT_SERVING. `--max-streams N`: the SETTINGS_MAX_CONCURRENT_STREAMS it announces (default: none).
Prints `ready` once serving.
"""
import argparse
import time
from concurrent import futures

import grpc

HEALTH_SERVING = b"\x08\x01"          # HealthCheckResponse{status: SERVING}
HEALTH_NOT_SERVING = b"\x08\x02"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("listen")
    parser.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    parser.add_argument("--health-file")
    parser.add_argument("--max-streams", type=int)
    args = parser.parse_args()
    name, port = args.listen.rsplit(":", 1)

    def unary(request, context):
        context.send_initial_metadata((("x-backend", name),))
        metadata = dict(context.invocation_metadata())
        trailers = [("x-trailer", name)]
        if "x-echo" in metadata:
            trailers.append(("x-echo", metadata["x-echo"]))
        context.set_trailing_metadata(tuple(trailers))
        return name.encode() + b":" + request

    def server_stream(request, context):
        for i in range(int(request)):
            yield f"{name}:{i}".encode()

    def bidi(requests, context):
        for request in requests:
            yield name.encode() + b":" + request

    def fail(request, context):
        context.set_trailing_metadata((("x-why", "refused"),))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad: " + request.decode())

    def sleep(request, context):
        time.sleep(float(request))
        return name.encode() + b":slept"

    def deadline(request, context):
        remaining = context.time_remaining()
        return b"none" if remaining is None else b"%.3f" % remaining

    def health(request, context):
        if args.health_file:
            with open(args.health_file) as f:
                if f.read().strip() != "SERVING":
                    return HEALTH_NOT_SERVING
        return HEALTH_SERVING

    handlers = grpc.method_handlers_generic_handler("test.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
        "Deadline": grpc.unary_unary_rpc_method_handler(deadline),
    })
    health_handlers = grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(health),
    })
    options = [("grpc.max_concurrent_streams", args.max_streams)] if args.max_streams else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=options)
    server.add_generic_rpc_handlers((handlers, health_handlers))
    serve(server, port, args.tls)


def serve(server, port, tls) -> None:
    """Listens on 127.0.0.1:PORT (TLS with tls = (CERT, KEY)), says `ready`, serves until killed
    (tests/grpc_health_backend.py's too)."""
    if tls:
        with open(tls[0], "rb") as cert, open(tls[1], "rb") as key:
            credentials = grpc.ssl_server_credentials(((key.read(), cert.read()),))
        server.add_secure_port(f"127.0.0.1:{port}", credentials)
    else:
        server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
