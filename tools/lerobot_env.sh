#!/usr/bin/env bash
# Builds .lerobot-venv/: LeRobot 0.6.1 itself, next to (not inside) the project's .venv, so that
# tests/test_lerobot_roundtrip.py (pytest -m slow) can check that our exports and adapters load in LeRobot and that
# LeRobot's PEFT runs load here.
#
# LeRobot 0.6.1 declares Python>=3.12 and torch<2.12; it runs on Python 3.11 with torch 2.13 (CPU) when:
#  - installed with --no-deps, its dependencies installed within its own bounds (torch held at 2.13.0);
#  - its few PEP 695 lines (`def f[T: X](...)`, `class C[T]`, `type X = ...`) are rewritten to 3.11 syntax;
#  - a small torchvision stand-in (tools/torchvision_standin/) is on the path: PyPI's torchvision needs a CUDA torch
#    here, and LeRobot only imports a few of its names when it loads a policy and its processors.
# Usage: tools/lerobot_env.sh [VENV_DIR]   (default .lerobot-venv in the repository root; safe to re-run)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.lerobot-venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
LEROBOT_VERSION="${LEROBOT_VERSION:-0.6.1}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
py="$VENV/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }
"$py" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_VERSION}')" 2>/dev/null \
  || pip install "torch==${TORCH_VERSION}"

# LeRobot's wheel says Requires-Python>=3.12, so pip on 3.11 will not resolve it: fetch the wheel as for 3.12.
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
pip download --no-deps --python-version 3.12 --only-binary=:all: "lerobot==${LEROBOT_VERSION}" -d "$wheels"
pip install --no-deps --ignore-requires-python "$wheels"/lerobot-*.whl

# Its core dependencies plus the [smolvla], [pi], [peft] extras and [dataset]'s readers (LeRobotDatasetMetadata, which
# make_policy takes for --policy.path; not torchcodec, which needs its own torch build), within LeRobot 0.6.1's bounds.
echo "torch==${TORCH_VERSION}" > "$wheels/constraints.txt"
pip install -c "$wheels/constraints.txt" \
  "numpy>=2.0.0,<2.3.0" "opencv-python-headless>=4.9.0,<4.14.0" "Pillow>=10.0.0,<13.0.0" "einops>=0.8.0,<0.9.0" \
  "draccus>=0.11.6,<0.12.0" "huggingface-hub>=1.6.0,<2.0.0" "requests>=2.32.0,<3.0.0" "gymnasium>=1.1.1,<2.0.0" \
  "safetensors>=0.4.3,<1.0.0" "packaging>=24.2,<26.0" "termcolor>=2.4.0,<4.0.0" "tqdm>=4.66.0,<5.0.0" \
  "setuptools>=71.0.0,<82.0.0" "transformers>=5.4.0,<5.6.0" "num2words>=0.5.14,<0.6.0" \
  "accelerate>=1.14.0,<2.0.0" "peft>=0.18.0,<1.0.0" "scipy>=1.14.0,<2.0.0" \
  "datasets>=4.8.0,<5.0.0" "pandas>=2.0.0,<3.0.0" "pyarrow>=21.0.0,<30.0.0" "jsonlines>=4.0.0,<5.0.0" \
  "av>=15.0.0,<16.0.0"

site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$py" tools/lerobot_py311.py "$site/lerobot"
rm -rf "$site/torchvision"
cp -r tools/torchvision_standin/torchvision "$site/torchvision"
"$py" -c "import lerobot, torch; from lerobot.policies.factory import get_policy_class, make_pre_post_processors; \
print('tools/lerobot_env.sh: $VENV ready: lerobot', lerobot.__version__, 'torch', torch.__version__)"
