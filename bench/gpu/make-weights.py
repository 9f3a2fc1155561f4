#!/usr/bin/env python3
"""Writes SIZE bytes of seeded random data to PATH with parallel pwrite (synthetic bf16 weights).
Usage: make-weights.py SIZE_BYTES PATH [WORKERS]"""
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np

CHUNK = 256 << 20


def fill(path, start, end, seed):
    rng = np.random.default_rng(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        off = start
        while off < end:
            n = min(CHUNK, end - off)
            os.pwrite(fd, rng.bytes(n), off)
            off += n
    finally:
        os.close(fd)


def main():
    size, path = int(sys.argv[1]), sys.argv[2]
    workers = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    if os.path.exists(path) and os.path.getsize(path) == size:
        print(f"{path}: exists")
        return
    with open(path, "wb") as f:
        f.truncate(size)
    per = -(-size // workers)
    per += -per % CHUNK  # chunk-aligned slices
    with ProcessPoolExecutor(workers) as ex:
        futs = [ex.submit(fill, path, s, min(s + per, size), 7 + i) for i, s in enumerate(range(0, size, per))]
        for f in futs:
            f.result()
    print(f"{path}: {size} bytes")


if __name__ == "__main__":
    main()
