"""Add to requirements.lock the SHA-256 of every file PyPI holds for each pinned version (every platform's wheel and
the sdist), so that `pip install --require-hashes` refuses any file that is not the one the suite was tested with.

    .venv/bin/python tools/hash_lock.py [requirements.lock]      # run by tools/refresh_lock.sh after a refresh

Reads the `name==version` lines (hashes already there are replaced) and keeps the header comments.
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s\\;]+)")
INDEX = "https://pypi.org/simple/{name}/"  # the simple API (PEP 691 JSON): every file of every release, with hashes


def read_pins(lock: Path) -> tuple[list[str], list[tuple[str, str]]]:
    header, pins = [], []
    for line in lock.read_text().splitlines():
        match = PIN.match(line)
        if match:
            pins.append((match.group(1), match.group(2)))
        elif line.startswith("#") and not pins:
            header.append(line)
    return header, pins


def file_version(filename: str) -> Version | None:
    try:
        if filename.endswith(".whl"):
            return parse_wheel_filename(filename)[1]
        return parse_sdist_filename(filename)[1]
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        return None


def file_hashes(name: str, version: str) -> list[str]:
    request = urllib.request.Request(INDEX.format(name=canonicalize_name(name)),
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    hashes = sorted({f["hashes"]["sha256"] for f in files
                     if file_version(f["filename"]) == Version(version) and "sha256" in f["hashes"]})
    if not hashes:
        raise SystemExit(f"hash_lock: PyPI lists no files for {name}=={version}")
    return hashes


def main() -> None:
    lock = Path(sys.argv[1] if len(sys.argv) > 1 else "requirements.lock")
    header, pins = read_pins(lock)
    with ThreadPoolExecutor(8) as pool:
        hashes = list(pool.map(lambda pin: file_hashes(*pin), pins))
    lines = list(header)
    for (name, version), digests in zip(pins, hashes):
        lines.append(f"{name}=={version} \\")
        lines.extend(f"    --hash=sha256:{h}" + (" \\" if i < len(digests) - 1 else "") for i, h in enumerate(digests))
    lock.write_text("\n".join(lines) + "\n")
    print(f"hash_lock: {len(pins)} pins, {sum(map(len, hashes))} file hashes written to {lock}")


if __name__ == "__main__":
    main()
