"""Lower bounds ("floors") any snapshot tool must pay, run as a standalone subprocess.

* walk: recursive os.scandir + lstat of every entry (what change detection costs at minimum)
* hash: walk + read every byte once and xxh3_128 it (what a first full snapshot costs at minimum)

Timed inside the process so interpreter start-up is excluded. Prints one JSON object.
Standalone on purpose (no package imports) so it can be run as `python floors.py MODE DIR`.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time

_CHUNK = 1 << 20


def walk(root: str) -> tuple[int, int, list[str]]:
    """Return (entries, total regular-file bytes, regular file paths)."""
    n, total, files = 0, 0, []
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)  # lstat (cached from getdents where possible)
                n += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)
                elif stat.S_ISREG(st.st_mode):
                    total += st.st_size
                    files.append(e.path)
    return n, total, files


def hash_all(files: list[str]) -> None:
    import xxhash

    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    for path in files:
        h = xxhash.xxh3_128()
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
        h.digest()


def main() -> None:
    mode, root = sys.argv[1], sys.argv[2]
    t0 = time.perf_counter()
    n, total, files = walk(root)
    if mode == "hash":
        hash_all(files)
    elif mode != "walk":
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps({"seconds": time.perf_counter() - t0, "entries": n, "bytes": total}))


if __name__ == "__main__":
    main()
