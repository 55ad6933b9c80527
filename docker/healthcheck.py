"""The image's HEALTHCHECK: GET /healthz on fastlb's admin bind, when it has one.

fastlb is the container's PID 1: its flags are read back from /proc/1/cmdline and resolved as fastlb
itself resolves them (a --config file included), so the check follows whatever admin bind was given.
Without an admin bind there is nothing to ask: the check passes while the process runs."""
import sys
import urllib.request

from fastlb.cli import config_from_args
from fastlb.config import ConfigError

TIMEOUT_SECONDS = 2
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def fastlb_flags() -> list[str]:
    """PID 1's arguments after the `fastlb` script (the kernel runs it as `python .../bin/fastlb ...`)."""
    with open("/proc/1/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0")[:-1]]
    scripts = [i for i, a in enumerate(argv) if a == "fastlb" or a.endswith("/fastlb")]
    return argv[scripts[0] + 1:] if scripts else []


def main() -> int:
    flags = fastlb_flags()
    if flags[:1] in (["demo"], ["ctl"]):
        return 0
    try:
        _, config = config_from_args(flags)
    except (ConfigError, SystemExit):
        return 0                    # fastlb itself reports bad flags (and exits)
    if config.admin is None:
        return 0
    host, port = config.admin
    host = WILDCARDS.get(host, host)
    url = f"http://[{host}]:{port}/healthz" if ":" in host else f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
