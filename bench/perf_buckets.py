#!/usr/bin/env python3
"""Where a process's CPU samples go, by thread and by part of the stack.

    perf script -i bench/out/profile-sync-memory-embedded.perf.data > /tmp/samples.txt
    bench/perf_buckets.py /tmp/samples.txt [--per-saga-us CPU_US] [--thread NAME]...

Reads `perf script` output of a `perf record --call-graph dwarf` profile (as bench/profile.sh
takes) and prints the share of samples by thread name, then, for each part below, the share of
samples whose stack passes through it anywhere (so the parts overlap: the saga engine's share
includes the gRPC client calls its steps make). With --per-saga-us, the process's CPU time per
saga, each share is also given in microseconds per saga. With --thread (repeatable), the parts
are also counted over the samples of each thread whose name starts with NAME, still as shares
of the whole process (so their microseconds add up to the thread's).
"""
import collections
import re
import sys

# (label, regular expression matched against each frame's symbol)
PARTS = [
    ("HTTP/2 (h2, any side)", r"^h2::|<h2::"),
    ("prost (protobuf)", r"prost::"),
    ("tower::buffer (channel hop per upstream call)", r"tower::buffer"),
    ("saga engine, forward part (with its steps' calls)", r"drive_forward"),
    ("the steps' upstream calls (booking nodes)", r"booking::node"),
    ("saga log calls from the engine", r"SagaLog>::(append|begin)"),
    ("serde_json", r"serde_json"),
    # Not `Instrumented`: that wrapper encloses whatever runs in a span.
    ("tracing (spans, events)", r"tracing_core|tracing_subscriber|tracing::span::|tracing::dispatcher"),
    ("metrics", r"^metrics|<metrics"),
    ("allocator (mimalloc)", r"^_?mi_|mi_free"),
    ("fdatasync", r"fdatasync"),
    ("futex", r"futex"),
    ("locks waited for (contended mutexes)", r"lock_contended"),
    ("socket sends (loopback: the receiver's TCP work too)", r"__GI___writev|__libc_sendmsg|__GI___libc_write$"),
    ("epoll_wait", r"epoll_wait"),
    ("scheduler (thread switches)", r"^__schedule$|^schedule$"),
    ("page faults", r"exc_page_fault"),
]


def samples(path):
    """Yields (thread name, [frame symbols, innermost first]) per sample."""
    thread, frames = None, None
    with open(path, errors="replace") as lines:
        for line in lines:
            if not line.strip():
                if frames is not None:
                    yield thread, frames
                thread, frames = None, None
            elif not line[0].isspace():
                thread, frames = line.split()[0], []
            elif frames is not None:
                parts = line.strip().split(" ", 1)
                if len(parts) == 2:
                    symbol = parts[1].rsplit(" (", 1)[0]
                    frames.append(re.sub(r"\+0x[0-9a-f]+$", "", symbol))
    if frames is not None:
        yield thread, frames


def main():
    args = sys.argv[1:]
    per_saga = None
    if "--per-saga-us" in args:
        at = args.index("--per-saga-us")
        per_saga = float(args[at + 1])
        del args[at : at + 2]
    threads = []
    while "--thread" in args:
        at = args.index("--thread")
        threads.append(args[at + 1])
        del args[at : at + 2]
    if len(args) != 1:
        sys.exit(__doc__)
    all_samples = list(samples(args[0]))
    total = len(all_samples)
    if total == 0:
        sys.exit("no samples in " + args[0])

    def show(label, count):
        share = count / total
        extra = f"  {share * per_saga:6.1f} µs/saga" if per_saga else ""
        print(f"  {100 * share:6.2f}%{extra}  {label}")

    print(f"{total} samples")
    print("by thread:")
    for thread, count in collections.Counter(t for t, _ in all_samples).most_common(10):
        show(thread, count)
    def parts(chosen):
        for label, pattern in PARTS:
            compiled = re.compile(pattern)
            show(label, sum(1 for _, frames in chosen if any(compiled.search(f) for f in frames)))

    print("by part of the stack (overlapping):")
    parts(all_samples)
    for name in threads:
        print(f"by part of the stack, threads named {name}*:")
        parts([(t, frames) for t, frames in all_samples if t.startswith(name)])


if __name__ == "__main__":
    main()
