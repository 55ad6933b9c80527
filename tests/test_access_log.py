"""The access log's C formatter and writer thread (fastlb/_accesslog.pyx), in process: its lines are the
Python reference's (observe.AccessLog._format_text / _format_json) byte for byte, and a disk that does
not keep up costs dropped lines, never a blocked caller or unbounded memory."""
import os
import random
import threading

import pytest

from fastlb.observe import AccessLog
from procs import wait_until

_accesslog = pytest.importorskip("fastlb._accesslog", reason="fastlb._accesslog is not built (make build)")

ENTRIES = [
    # HTTP: plain, a target with every byte json.dumps escapes (quote, backslash, controls, latin-1)
    (1700000000.1234, "127.0.0.1", "default", "127.0.0.1:8080", 200, 123, 456, 0.00012345, 0.0123456,
     "GET", "/a?q=1"),
    (1700000000.9995, "::1", "api", "10.0.0.2:80", 503, 0, 95, 0.0, 0.0005, "POST",
     '/q"\\\x01\x1f\x7f\n\r\t\b\x0c\xe9\xff x'),
    # the next second (the cached timestamp moves on), large numbers, a rounding edge
    (1700000001.0, "10.1.2.3", "p", "-", 0, 10 ** 12, 2 ** 40, 0.0015, 1234.5675, "OPTIONS", "*"),
    # TCP: no method; status as text
    (1700000002.5, "[::1]:5000", "default", "127.0.0.1:9", "-", 5, 6, 0.0005, 0.0015, None, None),
    (1700000002.75, "1.2.3.4:1", "default", "-", "no backend", 0, 0, 0.0, 1.5, None, None),
]


def written_and_expected(tmp_path, fmt, entries) -> tuple[str, str]:
    """The C writer's file after `entries`, and the Python reference's lines for them."""
    path = tmp_path / "access.log"
    log = AccessLog(None, str(path), fmt)
    assert log.writer is not None
    for entry in entries:
        log.add(entry)
    log.close()
    reference = AccessLog(None, str(tmp_path / "unused.log"), fmt, reference=True)
    expected = "".join(map(reference._format_json if fmt == "json" else reference._format_text, entries))
    reference.close()
    return path.read_text(), expected


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_lines_are_the_python_reference_lines(tmp_path, fmt):
    written, expected = written_and_expected(tmp_path, fmt, ENTRIES)
    assert written == expected


def timing_values():
    """Seconds whose milliseconds '%.3f' rounds at every kind of edge: exact ties of the thousandths
    (x.xxx5 ms), values a hair either side of one, whole milliseconds, large values (the formatter's
    snprintf side) and a spread of random ones."""
    rng = random.Random(16)
    values = [0.0, 1e-9, 5e-7, 0.0000005, 0.0025005, 1.0000005, 0.1234565, 999.9999995, 1073.7418235,
              1073.741824, 1073741.824, 5000.0, 86400.123456, 1e12, 0.5, 2.0 ** -20]
    for _ in range(500):
        thousandths = rng.randrange(0, 10 ** rng.randrange(1, 10))
        values.append((thousandths + 0.5) / 1e6)                       # a tie, as a decimal
        values.append((thousandths + rng.choice((0.4999999, 0.5000001, 0.0, 0.999))) / 1e6)
        values.append(rng.random() * 10.0 ** rng.randrange(-6, 4))
    return values


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_times_are_rounded_as_the_python_reference_rounds_them(tmp_path, fmt):
    """The formatter writes numbers without printf where it can: its milliseconds are '%.3f's."""
    values = timing_values()
    entries = [(1700000000.0 + i % 1000 / 1000, "127.0.0.1", "default", "127.0.0.1:8080", 200, i, 2 ** 62 + i,
                seconds, values[-1 - i], "GET", "/") for i, seconds in enumerate(values)]
    written, expected = written_and_expected(tmp_path, fmt, entries)
    assert written.count("\n") == len(entries)
    assert written == expected


def test_a_quiet_log_is_written_without_a_close(tmp_path):
    path = tmp_path / "access.log"
    writer = _accesslog.LogWriter(str(path), "text")
    try:
        writer.add(ENTRIES[0])
        wait_until(lambda: path.read_text().count("\n") == 1, what="the line written by the thread")
    finally:
        writer.close()


def test_a_stalled_disk_drops_lines_and_never_blocks(tmp_path):
    """A FIFO nobody reads: the writer thread blocks in write(), the caller goes on, the buffers fill
    and the lines beyond them are dropped and counted; once the reader drains, every kept line lands."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)      # so that the writer's open does not wait
    writer = _accesslog.LogWriter(str(fifo), "text")
    added = 0
    try:
        while writer.dropped == 0 and added < 200_000:          # 16 buffers of 256 KiB fill long before
            writer.add(ENTRIES[0])
            added += 1
        assert writer.dropped > 0
        extra = 1000
        for _ in range(extra):
            writer.add(ENTRIES[0])
        added += extra
        received = bytearray()

        def drain():
            import select
            while True:
                select.select([reader], [], [], 5)
                try:
                    chunk = os.read(reader, 1 << 20)
                except BlockingIOError:
                    continue
                if not chunk:
                    return
                received.extend(chunk)

        thread = threading.Thread(target=drain)
        thread.start()
        dropped = writer.dropped
        writer.close()                                          # writes every buffered line, then EOF
        thread.join(30)
        assert not thread.is_alive()
    finally:
        writer.close()
        os.close(reader)
    lines = received.count(b"\n")
    assert lines + dropped == added
    assert lines <= 16 * 262144 // 80                           # bounded: no more than the buffers hold
