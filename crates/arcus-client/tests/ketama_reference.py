#!/usr/bin/env python3
"""Reference ketama for arcus-client's ring tests, written from the ARCUS spec with hashlib only
(nothing shared with the Rust code).

  ketama_reference.py owners NODE...   keys on stdin (one per line) -> "<hash> <owner>" per key
  ketama_reference.py collide          prints two node addresses whose rings share a point,
                                       the shared point, and the address the Java client picks
"""
import bisect
import hashlib
import sys


def points(addr):
    out = []
    for i in range(40):
        d = hashlib.md5(f"{addr}-{i}".encode()).digest()
        for k in range(4):
            out.append(int.from_bytes(d[4 * k:4 * k + 4], "little"))
    return out


def key_hash(key):
    return int.from_bytes(hashlib.md5(key.encode("utf-8")).digest()[:4], "little")


def continuum(nodes):
    owner = {}
    for n in nodes:
        for p in points(n):
            # Java keeps a TreeSet per point ordered by the address string and uses first().
            if p not in owner or n < owner[p]:
                owner[p] = n
    keys = sorted(owner)
    return keys, [owner[p] for p in keys]


def owners(nodes):
    pts, names = continuum(nodes)
    for line in sys.stdin:
        key = line.rstrip("\n")
        h = key_hash(key)
        i = bisect.bisect_left(pts, h)
        print(h, names[i % len(pts)])


def collide():
    seen = {}
    for a in range(256):
        for b in range(1, 255):
            addr = f"10.{a}.{b}.7:11211"
            for p in points(addr):
                other = seen.get(p)
                if other is not None and other != addr:
                    print(other, addr, p, min(other, addr))
                    return
                seen[p] = addr
    sys.exit("no collision found")


if __name__ == "__main__":
    if sys.argv[1] == "owners":
        owners(sys.argv[2:])
    elif sys.argv[1] == "collide":
        collide()
