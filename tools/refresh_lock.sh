#!/usr/bin/env bash
# Re-resolve every dependency to the newest release pyproject.toml allows, in a fresh .venv-refresh, run the fast
# test suite there, and only if it passes write requirements.lock from it. Then commit the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
venv=.venv-refresh
rm -rf "$venv"
"$PYTHON" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install "torch==${TORCH_VERSION}"
pip install -c <(echo "torch==${TORCH_VERSION}") -e ".[dev,sim]"
"$venv/bin/python" -m pytest
{
  sed -n '1,3p' requirements.lock
  "$venv/bin/python" -m pip freeze --all --exclude-editable | grep -v -e "^torch==" -e "^pip=="
} > requirements.lock.new
"$venv/bin/python" tools/hash_lock.py requirements.lock.new  # the SHA-256 of every file of each pinned version
mv requirements.lock.new requirements.lock
rm -rf "$venv"
echo "tools/refresh_lock.sh: requirements.lock refreshed and the suite passed on it; review the diff and commit"
