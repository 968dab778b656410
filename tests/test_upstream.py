"""What the project relies on from its dependencies beyond their public API, checked against the installed versions:
each test fails with the package, the change and the file of ours to update. Also: requirements.lock pins every
dependency pyproject.toml declares, within its range."""

from __future__ import annotations

import inspect
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def changed(package: str, what: str, ours: str) -> str:
    return f"{package} {version(package)} changed: {what}; update {ours}"


def test_accelerate_state_reset_used_between_runs_in_one_process():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    assert isinstance(getattr(AcceleratorState, "_shared_state", None), dict), \
        changed("accelerate", "AcceleratorState._shared_state is gone", "finetune/training/distributed.py")
    assert callable(getattr(AcceleratorState, "_reset_state", None)), \
        changed("accelerate", "AcceleratorState._reset_state() is gone", "finetune/training/distributed.py")
    assert isinstance(getattr(Accelerator(cpu=True), "_custom_objects", None), list), \
        changed("accelerate", "Accelerator._custom_objects is gone", "finetune/train.py run_training")


def test_torchrun_reads_the_signals_to_handle_from_the_environment():
    """launch.sh keeps torchrun off SIGTERM/SIGINT with TORCHELASTIC_SIGNALS_TO_HANDLE (the ranks save instead)."""
    from torch.distributed.elastic.multiprocessing import api

    assert "TORCHELASTIC_SIGNALS_TO_HANDLE" in inspect.getsource(api), \
        changed("torch", "torchrun no longer reads TORCHELASTIC_SIGNALS_TO_HANDLE", "launch.sh")


def test_dataloader_iterator_shuts_down_its_workers():
    iterator_class = torch.utils.data.dataloader._MultiProcessingDataLoaderIter
    assert callable(getattr(iterator_class, "_shutdown_workers", None)), \
        changed("torch", "DataLoader's iterator has no _shutdown_workers()", "finetune/data/workers.py stop_workers")
    assert "_iterator" in inspect.getsource(torch.utils.data.DataLoader.__init__), \
        changed("torch", "DataLoader keeps no _iterator", "finetune/data/workers.py stop_workers")


def test_gemma_eager_attention_takes_the_arguments_pi0_passes():
    from transformers.models.gemma import modeling_gemma

    params = inspect.signature(modeling_gemma.eager_attention_forward).parameters
    assert list(params)[:5] == ["module", "query", "key", "value", "attention_mask"] and "scaling" in params, \
        changed("transformers", f"eager_attention_forward{inspect.signature(modeling_gemma.eager_attention_forward)}",
                "finetune/policies/pi0.py")


def test_onednn_linear_op_is_there_or_the_cpu_linear_falls_back():
    from finetune.policies import cpu_linear

    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    if cpu_linear.onednn_available():
        torch.testing.assert_close(cpu_linear._onednn_matmul(x, w, b), torch.nn.functional.linear(x, w, b))
    else:
        pytest.skip(f"torch {torch.__version__}: no mkldnn._linear_pointwise, --policy.cpu-linear falls back to aten")


def test_the_lock_pins_every_declared_dependency_within_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in ("dev", "sim") for r in project["optional-dependencies"][extra]]
    locked, hashes = {}, {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith(("#", " ")):
            name, _, pinned = line.rstrip(" \\").partition("==")
            name = re.sub(r"[-_.]+", "-", name).lower()
            locked[name], hashes[name] = pinned, 0
        elif line.strip().startswith("--hash=sha256:"):
            assert re.fullmatch(r"--hash=sha256:[0-9a-f]{64}( \\)?", line.strip()), line
            hashes[name] += 1
    assert all(hashes.values()), [n for n, count in hashes.items() if not count]  # pip --require-hashes needs them
    for req in declared:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name == "torch":  # pinned by setup.sh (TORCH_VERSION), the CPU build installed first
            continue
        assert name in locked, f"requirements.lock has no {req.name}: run tools/refresh_lock.sh"
        assert req.specifier.contains(locked[name], prereleases=True), (req, locked[name])
        assert version(req.name) == locked[name], f"installed {req.name} {version(req.name)} is not the locked one"
