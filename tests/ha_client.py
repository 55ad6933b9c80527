"""A bounded client for the HA test: `python ha_client.py HOST PORT SECONDS`.

Connects again and again (at most every 20 ms, for at most SECONDS), reads the backend's
name line, and prints `ok NAME` or `fail REASON`, each with seconds since start.
"""
import socket
import sys
import time


def main(host: str, port: int, seconds: float) -> None:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        began = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=0.3) as sock:
                sock.settimeout(0.3)
                name = sock.recv(100).split(b"\n")[0].decode()
                outcome = f"ok {name}" if name else "fail closed"
        except OSError as exc:
            outcome = f"fail {exc.__class__.__name__}"
        print(f"{outcome} {time.monotonic() - start:.3f}", flush=True)
        time.sleep(max(0.0, 0.02 - (time.monotonic() - began)))
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
