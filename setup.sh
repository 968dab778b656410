#!/usr/bin/env bash
# Sets up .venv with everything the project needs. Safe to re-run; `--dev` adds the test tools and the Meta-World
# simulator (the [sim] extra) that the closed-loop tests run.
# torch is pinned and installed first so that no other package pulls a multi-GB CUDA build; every other dependency
# is held to requirements.lock (refresh it with tools/refresh_lock.sh).
set -euo pipefail
cd "$(dirname "$0")"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==${TORCH_VERSION}" > "$constraints"
cat requirements.lock >> "$constraints"  # every other dependency at the version the suite was tested with

pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}')" 2>/dev/null \
  || pip install "torch==${TORCH_VERSION}"
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev,sim]"
pip install -c "$constraints" -e ".${extra}"
echo "setup.sh: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
