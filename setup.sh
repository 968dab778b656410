#!/usr/bin/env bash
# Sets up .venv with everything the project needs, the test tools and the Meta-World simulator included (the lock is
# one tested set). Safe to re-run; `--dev` also records the [dev,sim] extras in the project's install.
# torch is pinned and installed first so that no other package pulls a multi-GB CUDA build; every other dependency
# is installed from requirements.lock, hash-checked (refresh it with tools/refresh_lock.sh).
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}')" 2>/dev/null \
  || pip install "torch==${TORCH_VERSION}"
# Every other dependency exactly as tested: the lock's version and one of the files whose SHA-256 it lists (pip refuses
# anything else), then the project itself with nothing more resolved; pip check confirms the set is complete.
pip install --require-hashes --no-deps -r requirements.lock
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev,sim]"
pip install --no-deps -e ".${extra}"
.venv/bin/python -m pip check >/dev/null || { .venv/bin/python -m pip check >&2; exit 1; }
echo "setup.sh: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
