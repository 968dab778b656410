"""What resume needs beyond the trained weights, without pickles: optimizer tensors in safetensors, its settings, the
scheduler and the RNG states in JSON. Loading one executes nothing from the checkpoint, so a run folder copied from
elsewhere is as safe to resume as to read.

    training_state/optimizer.safetensors   per parameter: step, exp_avg, exp_avg_sq, ... (AdamW's state)
    training_state/optimizer.json          param_groups (lr, betas, ...) and any non-tensor state
    training_state/scheduler.json          the LR scheduler's state (its lambda is code, rebuilt from the config)
    training_state/rng_<rank>.safetensors  torch's CPU (and CUDA) generator states, per rank
    training_state/rng_<rank>.json         Python's and NumPy's generator states, per rank

DeepSpeed keeps its ZeRO-sharded optimizer in its own checkpoint format, which it reads with torch.load and full
unpickling. Those files are signed when written (`pickles.sig.json`: their SHA-256 under an HMAC with a key kept in
the user's home, `~/.cache/finetune/checkpoint.key`, shared by the nodes of a cluster that share the home), so a run
resumes its own checkpoints as before. A pickle that is not signed with that key (a planted or downloaded one, or
one written before this format: Accelerate's optimizer.bin, scheduler.bin, random_states_*.pkl) is loaded only when
torch.load(weights_only=True) can read it, or with --checkpoint.trust-pickles.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_SETTINGS = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
PICKLED_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")
SIGNATURE_FILE = "pickles.sig.json"
KEY_FILE_ENV = "FINETUNE_CHECKPOINT_KEY_FILE"


def has_safe_state(folder: Path) -> bool:
    return (folder / OPTIMIZER_TENSORS).is_file() and (folder / SCHEDULER_FILE).is_file()


def save_optimizer(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    state = optimizer.state_dict()
    tensors, other = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                other[f"{index}.{key}"] = value
    save_file(tensors, str(folder / OPTIMIZER_TENSORS))
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state["param_groups"]]
    (folder / OPTIMIZER_SETTINGS).write_text(json.dumps({"param_groups": groups, "state": other}, indent=1) + "\n")


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    settings = json.loads((folder / OPTIMIZER_SETTINGS).read_text())
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*load_file(str(folder / OPTIMIZER_TENSORS)).items(), *settings["state"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in settings["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_scheduler(folder: Path, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}  # code, rebuilt from the config
    (folder / SCHEDULER_FILE).write_text(json.dumps(state, indent=1) + "\n")


def load_scheduler(folder: Path, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    state = json.loads((folder / SCHEDULER_FILE).read_text())
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})


def save_rng(folder: Path, rank: int) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, str(folder / f"rng_{rank}.safetensors"))
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    (folder / f"rng_{rank}.json").write_text(json.dumps({
        "python": [version, list(words), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}) + "\n")


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this rank's generators; False when the checkpoint has none for it (another process count)."""
    tensors_file, json_file = folder / f"rng_{rank}.safetensors", folder / f"rng_{rank}.json"
    if not tensors_file.is_file() or not json_file.is_file():
        return False
    tensors = load_file(str(tensors_file))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    states = json.loads(json_file.read_text())
    version, words, gauss = states["python"]
    random.setstate((version, tuple(words), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return True


def _key() -> bytes:
    """This user's signing key (made on first use, readable by the user only)."""
    path = Path(os.environ.get(KEY_FILE_ENV) or Path.home() / ".cache" / "finetune" / "checkpoint.key")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(secrets.token_bytes(32))
        tmp.chmod(0o600)
        os.replace(tmp, path)  # two processes racing: one key wins, both then read it
    return path.read_bytes()


def _pickles(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in PICKLED_SUFFIXES)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sign_pickles(folder: Path) -> None:
    """Record the pickled files this run wrote (DeepSpeed's) under this user's key, so its resume trusts them."""
    files = {str(p.relative_to(folder)): _digest(p) for p in _pickles(folder)}
    if not files:
        return
    body = json.dumps(files, sort_keys=True)
    mac = hmac.new(_key(), body.encode(), hashlib.sha256).hexdigest()
    (folder / SIGNATURE_FILE).write_text(json.dumps({"files": files, "hmac": mac}, indent=1) + "\n")


def signed_files(folder: Path) -> set[str]:
    """The pickled files under `folder` signed with this user's key and unchanged since."""
    try:
        saved = json.loads((folder / SIGNATURE_FILE).read_text())
        body = json.dumps(saved["files"], sort_keys=True)
        if not hmac.compare_digest(hmac.new(_key(), body.encode(), hashlib.sha256).hexdigest(), saved["hmac"]):
            return set()
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {name for name, digest in saved["files"].items()
            if (folder / name).is_file() and hmac.compare_digest(_digest(folder / name), digest)}


def unsafe_files(folder: Path) -> list[str]:
    """Pickled files under `folder` that could run code when loaded in full: neither signed by this user's runs nor
    readable by torch.load(weights_only=True). JSON and safetensors files are not looked at."""
    signed, unsafe = signed_files(folder), []
    for path in _pickles(folder):
        if str(path.relative_to(folder)) in signed:
            continue
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any failure means "not plain tensors": not loaded in full unasked
            unsafe.append(str(path.relative_to(folder)))
    return unsafe
