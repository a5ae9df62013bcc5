#!/usr/bin/env python3
"""Builds a small Debian-format repository for the apt test:

  <root>/debian/pool/main/h/holdfast-test/holdfast-test_1.0_all.deb
  <root>/debian/dists/stable/main/binary-amd64/Packages
  <root>/debian/dists/stable/Release

The package is built with dpkg-deb; it carries a payload of --size bytes so
it spans several cache blocks. The Release file is unsigned (the test's
sources.list uses [trusted=yes]).
"""

import argparse
import hashlib
import os
import subprocess
import tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--size", type=int, default=3 * 1024 * 1024 + 12345)
    args = ap.parse_args()
    base = os.path.join(args.root, "debian")
    pool = os.path.join(base, "pool/main/h/holdfast-test")
    os.makedirs(pool, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        pkg = os.path.join(work, "pkg")
        os.makedirs(os.path.join(pkg, "DEBIAN"))
        os.makedirs(os.path.join(pkg, "usr/share/holdfast-test"))
        with open(os.path.join(pkg, "usr/share/holdfast-test/payload.bin"), "wb") as f:
            # Incompressible, so the .deb is as large as the payload.
            f.write(os.urandom(args.size))
        with open(os.path.join(pkg, "DEBIAN/control"), "w") as f:
            f.write(
                "Package: holdfast-test\nVersion: 1.0\nArchitecture: all\n"
                "Maintainer: Holdfast tests <tests@example.invalid>\n"
                "Description: payload for the range cache apt test\n"
            )
        deb = os.path.join(pool, "holdfast-test_1.0_all.deb")
        subprocess.run(["dpkg-deb", "-Znone", "--build", pkg, deb], check=True, stdout=subprocess.DEVNULL)
    with open(deb, "rb") as f:
        data = f.read()
    rel = os.path.relpath(deb, base)
    packages = (
        "Package: holdfast-test\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: Holdfast tests <tests@example.invalid>\n"
        f"Filename: {rel}\nSize: {len(data)}\n"
        f"MD5sum: {hashlib.md5(data).hexdigest()}\n"
        f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
        "Description: payload for the range cache apt test\n\n"
    ).encode()
    dist = os.path.join(base, "dists/stable")
    bindir = os.path.join(dist, "main/binary-amd64")
    os.makedirs(bindir, exist_ok=True)
    with open(os.path.join(bindir, "Packages"), "wb") as f:
        f.write(packages)
    entry = "main/binary-amd64/Packages"
    release = (
        "Origin: holdfast-test\nLabel: holdfast-test\nSuite: stable\nCodename: stable\n"
        "Date: Sun, 22 Nov 2026 00:00:00 UTC\nArchitectures: amd64\nComponents: main\n"
        f"MD5Sum:\n {hashlib.md5(packages).hexdigest()} {len(packages)} {entry}\n"
        f"SHA256:\n {hashlib.sha256(packages).hexdigest()} {len(packages)} {entry}\n"
    )
    with open(os.path.join(dist, "Release"), "w") as f:
        f.write(release)
    print(rel)


if __name__ == "__main__":
    main()
