"""testssl.sh against a fastlb TLS bind: protocols, ciphers, vulnerabilities. Slow (minutes), so it lives
here rather than in the test suite.

    python benchmarks/testssl_check.py              (needs the Debian package testssl.sh: `testssl` on PATH)
    python benchmarks/testssl_check.py --mode http  (the HTTP engine's TLS, fastlb/http/_etls.pxi)

Starts fastlb on 127.0.0.1 with an ECDSA P-256 certificate in front of one nginx backend (`--mode tcp`,
the default: the relay thread terminates TLS; `--mode http`: the HTTP engine does), runs
`testssl --quiet --color 0 --warnings off --jsonfile ...`, prints each finding above INFO/OK severity
(LOW, MEDIUM, HIGH, CRITICAL, WARN) and writes the whole JSON to benchmarks/results/. Exits 1 when
testssl reports anything MEDIUM or worse.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import harness as h  # noqa: E402
from tls_bench import SERVER_NAME, make_certificate  # noqa: E402

SERIOUS = ("MEDIUM", "HIGH", "CRITICAL")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("tcp", "http"), default="tcp",
                        help="fastlb's mode: tcp (the relay thread's TLS) or http (the HTTP engine's)")
    args = parser.parse_args(argv)
    testssl = h.which("testssl") or h.which("testssl.sh")
    if not testssl:
        raise SystemExit("testssl is not installed: apt-get install testssl.sh")
    bench = h.Bench()
    try:
        bench.start_backends()
        pem = make_certificate(bench.tmp)
        port = h.free_port()
        env = dict(os.environ, PYTHONPATH=h.REPO_ROOT)
        lb = bench.procs.start("fastlb", [sys.executable, "-m", "fastlb", "--mode", args.mode,
                                          "--bind", f"{h.HOST}:{port},ssl,cert={pem}",
                                          "--backend", f"{h.HOST}:{bench.backend_ports[0]}"],
                               log_dir=bench.tmp, env=env, cwd=h.REPO_ROOT)
        h.wait_listening(port, lb)
        os.makedirs(h.RESULTS_DIR, exist_ok=True)
        json_path = os.path.join(h.RESULTS_DIR, f"testssl-{args.mode}-{time.strftime('%Y%m%d-%H%M%S')}.json")
        run = bench.procs.start("testssl", [testssl, "--quiet", "--color", "0", "--warnings", "off",
                                            "--ip", h.HOST, "--jsonfile", json_path, f"{SERVER_NAME}:{port}"],
                                stdout=subprocess.PIPE)
        out, _ = run.popen.communicate(timeout=1800)
        bench.procs.stop(run)
        text = out.decode(errors="replace")
        with open(json_path.replace(".json", ".txt"), "w") as f:
            f.write(text)
    finally:
        bench.close()
    findings = json.load(open(json_path))
    by_severity = collections.Counter(f["severity"] for f in findings)
    print(f"testssl {h.tool_versions().get('testssl', '')}: {len(findings)} findings, by severity: "
          f"{dict(sorted(by_severity.items()))}")
    for finding in findings:
        if finding["severity"] not in ("OK", "INFO", "DEBUG"):
            print(f"  {finding['severity']:8} {finding['id']}: {finding['finding']}")
    print(f"full output: {json_path} and .txt")
    return 1 if any(f["severity"] in SERIOUS for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
