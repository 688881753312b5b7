#!/usr/bin/env python3
"""The top sites of a DHAT profile (heap or copy mode), per saga.

    dhat_top.py DHAT.JSON SAGAS [TOP]

Prints the program points with the most bytes and the most blocks, each with the first frames of
its stack that belong to a Rust crate rather than to the allocator or the standard library.
"""
import json
import sys

SKIP_FILES = ("library/", "/rustc/", "(alloc.rs", "(unix.rs", "(raw_vec", "vgpreload", "(vec", "(boxed.rs",
              "(string.rs", "(slice.rs", "(sync.rs", "(clone.rs", "(bytes_mut.rs", "(borrow.rs")
SKIP = ("alloc::", "core::", "std::", "hashbrown::raw", "__rust", "__rdl", "<alloc::", "<core::",
        "???", "malloc", "realloc", "memcpy", "memmove", "__memcpy", "__memmove", "bytes::bytes_mut::BytesMut::reserve")


def frames(doc, pp, depth=4):
    names = []
    for index in pp["fs"]:
        frame = doc["ftbl"][index]
        # "0x1234: function (file:line)"
        text = frame.split(": ", 1)[-1]
        if any(text.startswith(s) for s in SKIP) or any(s in text for s in SKIP_FILES):
            continue
        names.append(text[:150])
        if len(names) == depth:
            break
    return names


def main():
    path, sagas = sys.argv[1], float(sys.argv[2])
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 15
    doc = json.load(open(path))
    pps = doc["pps"]
    total_bytes = sum(pp["tb"] for pp in pps)
    total_blocks = sum(pp["tbk"] for pp in pps)
    print(f"{doc.get('mode', 'heap')} profile, {sagas:.0f} sagas (the whole run, warm-up and start included):")
    print(f"  total {total_bytes / sagas:,.0f} bytes, {total_blocks / sagas:,.1f} blocks per saga")
    for key, label in (("tb", "bytes"), ("tbk", "blocks")):
        print(f"\ntop sites by {label} (per saga):")
        for pp in sorted(pps, key=lambda pp: -pp[key])[:top]:
            print(f"  {pp['tb'] / sagas:>10,.0f} B {pp['tbk'] / sagas:>7,.1f} blocks")
            for name in frames(doc, pp):
                print(f"        {name}")


if __name__ == "__main__":
    main()
