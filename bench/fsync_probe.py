#!/usr/bin/env python3
"""How long this machine's disk takes to make a small write durable, without sagaflow.

Appends 4 KB entries to a 16 MiB file with `pwrite` + `fdatasync`, one every 0.5 ms, as the
embedded saga log's writer does at a moderate rate, for SECONDS; prints percentiles and every
sync slower than 50 ms. Run it beside a load on the in-memory saga log (which writes nothing)
to see the tail that a durable log on this disk cannot avoid:

    python3 bench/fsync_probe.py [SECONDS] [DIR]

DIR defaults to the system's temporary directory (where the bench scripts keep the log).
"""

import os
import sys
import tempfile
import time

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
directory = sys.argv[2] if len(sys.argv) > 2 else tempfile.gettempdir()
SIZE = 16 << 20
ENTRY = b"x" * 4000

path = os.path.join(directory, f"fsync-probe-{os.getpid()}")
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
try:
    # Written and synced once first, so later syncs flush data only, as the saga log's do.
    for offset in range(0, SIZE, 1 << 20):
        os.pwrite(fd, bytes(1 << 20), offset)
    os.fsync(fd)
    latencies, slow, offset = [], [], 0
    start = time.monotonic()
    while (now := time.monotonic()) - start < seconds:
        began = time.perf_counter()
        os.pwrite(fd, ENTRY, offset)
        os.fdatasync(fd)
        took = time.perf_counter() - began
        latencies.append(took)
        if took > 0.05:
            slow.append(f"{now - start:.1f}s: {took * 1000:.0f} ms")
        offset = (offset + 4096) % SIZE
        time.sleep(0.0005)
finally:
    os.close(fd)
    os.unlink(path)

latencies.sort()
n = len(latencies)
quantile = lambda q: f"{latencies[min(n - 1, int(n * q))] * 1000:.2f} ms"
print(f"fsync probe: {n} syncs of 4 KB in {seconds:.0f} s in {directory}")
print(f"  p50 {quantile(0.5)}, p99 {quantile(0.99)}, p99.9 {quantile(0.999)}, max {latencies[-1] * 1000:.1f} ms")
print(f"  slower than 50 ms: {len(slow)}" + (f" ({', '.join(slow)})" if slow else ""))
