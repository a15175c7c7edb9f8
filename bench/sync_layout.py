#!/usr/bin/env python3
"""How a data file's layout sets the cost of a flush on this file system.

Writes 40000 random 4 KiB blocks with pwrite and an fdatasync after every 64 (a guest's
periodic flush), and prints the syncs' p50/p99/max. Layouts: the volume's own offsets in a
sparse file of 1 TiB and of 1 GiB (cairn's layer map format version 1), chunks packed in the
order first written (format version 2, docs/format.md section 3.1), and a pure append.
docs/architecture.md ("Chunk placement") quotes its figures.

usage: bench/sync_layout.py [DIR]   (default /var/tmp; keep it off tmpfs)
"""
import os
import random
import sys
import time

WRITES = 40000
FLUSH_EVERY = 64
BLOCK = 4096


def run(directory, label, volume_size, chunk):
    """chunk: None for the volume's offsets, 0 for append, else the chunk size in bytes."""
    path = os.path.join(directory, "sync-layout.tmp")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        data = os.urandom(BLOCK)
        rng = random.Random(1)
        slots = {}
        syncs = []
        for i in range(1, WRITES + 1):
            offset = rng.randrange(volume_size // BLOCK) * BLOCK
            if chunk == 0:
                offset = (i - 1) * BLOCK
            elif chunk:
                slot = slots.setdefault(offset // chunk, len(slots))
                offset = slot * chunk + offset % chunk
            os.pwrite(fd, data, offset)
            if i % FLUSH_EVERY == 0:
                start = time.perf_counter()
                os.fdatasync(fd)
                syncs.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        os.remove(path)
    syncs.sort()
    ms = lambda q: syncs[min(len(syncs) - 1, int(len(syncs) * q))] * 1e3
    print(f"| {label} | {len(syncs)} | {ms(0.5):.2f} | {ms(0.99):.2f} | {syncs[-1] * 1e3:.2f} |", flush=True)


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"
    print(f"{WRITES} random 4 KiB writes, fdatasync every {FLUSH_EVERY}, in {directory}\n")
    print("| layout | syncs | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    run(directory, "1 TiB, the volume's offsets (v1)", 1 << 40, None)
    run(directory, "1 TiB, 2 MiB chunks packed (v2)", 1 << 40, 2 << 20)
    run(directory, "1 TiB, 64 KiB chunks packed", 1 << 40, 64 << 10)
    run(directory, "1 GiB, the volume's offsets (v1)", 1 << 30, None)
    run(directory, "1 GiB, 2 MiB chunks packed (v2)", 1 << 30, 2 << 20)
    run(directory, "append", 1 << 40, 0)


if __name__ == "__main__":
    main()
