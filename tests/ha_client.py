"""A bounded client for the HA test: `python ha_client.py HOST PORT SECONDS [SOURCE_IP ...]`.

Connects again and again (at most every 20 ms, for at most SECONDS), each time from the next
source address given (or the default one), reads the backend's greeting line, and prints
`ok GREETING from SOURCE` or `fail REASON from SOURCE`, each with seconds since start.
"""
import itertools
import socket
import sys
import time


def attempt(host: str, port: int, source: str | None) -> str:
    try:
        with socket.create_connection((host, port), timeout=0.3,
                                      source_address=(source, 0) if source else None) as sock:
            sock.settimeout(0.3)
            greeting = sock.recv(200).split(b"\n")[0].decode()
            return f"ok {greeting}" if greeting else "fail closed"
    except OSError as exc:
        return f"fail {exc.__class__.__name__}"


def main(host: str, port: int, seconds: float, sources: list[str]) -> None:
    start = time.monotonic()
    for source in itertools.cycle(sources or [None]):
        began = time.monotonic()
        if began - start >= seconds:
            break
        print(f"{attempt(host, port, source)} from {source or '-'} {began - start:.3f}", flush=True)
        time.sleep(max(0.0, 0.02 - (time.monotonic() - began)))
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4:])
