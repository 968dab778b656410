"""float32 linear layers through oneDNN's GEMM on CPU.

torch's CPU `linear`/`mm` calls MKL's sgemm. On CPUs that MKL does not give its AVX-512 kernels (AMD EPYC among
them) that runs at about half the core's float32 peak, while oneDNN (bundled with torch as MKL-DNN) JITs AVX-512
kernels for whatever CPU it finds: on this project's AMD EPYC dev machine 310-470 GFLOP/s against MKL's 180-220 on
the same two cores, forward and both backward products (`bench/linear.py`; the whole step: `bench/step.py`). The
math is the same float32 multiply-accumulate in another order: outputs agree with MKL's to float32 rounding (tested
against float64).

Which is faster depends on the CPU (MKL's AVX-512 kernels on Intel, none on AMD), the shapes and the threads, so the
default, `auto`, measures: `choose_kernels` times both kernels on each of the model's linear shapes (forward and the
backward products the layer needs, a few milliseconds each), keeps the faster per shape, and caches the choice per
CPU model, torch version and thread count (`~/.cache/finetune/cpu_linear.json`), so later runs skip the probe.

`use_cpu_linear(model, "onednn")` turns every plain `nn.Linear` (base layers, LoRA's A/B, heads) into a
`OneDNNLinear`, and "aten" into an `AtenLinear`: subclasses with the same parameters and state dict, so PEFT wrappers,
saving and merging see no difference. `OneDNNLinear` takes the oneDNN path only for float32 CPU inputs outside
autocast and torch.compile; anything else (CUDA, bf16, half storage, autocast, compiled graphs) goes through
`F.linear` as before. Quantized layers (bitsandbytes) are not plain `nn.Linear`s and are left alone.

Both classes keep, in training mode under CPU bf16 autocast, the bf16 copy of a frozen weight that autocast would
make again at every call (casting the real-size SmolVLA's ~350M frozen weights costs 0.2-0.3 s per step, a fifth of
a batch-2 bf16 step). It is the same rounding, so the same numbers, for 2 bytes per frozen weight while training.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CPU_LINEARS = ("auto", "onednn", "aten")
CpuLinear = Literal["auto", "onednn", "aten"]
PROBE_TOKENS = 512  # rows of the probe's products: the order of a training batch's tokens per layer call
PROBE_REPEATS = 3
PROBE_BUDGET_S = 0.05
CACHE_ENV = "FINETUNE_CPU_LINEAR_CACHE"


def _onednn_matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ weight.T + bias for (..., K) x and an (N, K) weight, strided views accepted (no transposed copies)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return _onednn_matmul(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # dx = dy @ W = linear(dy, W.T)
            grad_x = _onednn_matmul(grad, weight.t(), None)
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:  # dW = dy.T @ x = linear(dy.T, x.T)
            grad_w = _onednn_matmul(flat.t(), x.reshape(-1, x.shape[-1]).t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b


class AtenLinear(nn.Linear):
    """An `nn.Linear` on torch's own kernels that, training under CPU bf16 autocast, casts a frozen weight once."""

    def _bf16_operands(self) -> tuple[Tensor, Tensor | None] | None:
        """The frozen weight and bias in bf16, made on first use and kept while the weight is unchanged; None where
        autocast's own cast applies (eval mode, a trained or non-float32 weight, no CPU bf16 autocast, compiling)."""
        weight = self.weight
        if (not self.training or weight.requires_grad or weight.dtype != torch.float32 or weight.device.type != "cpu"
                or not torch.is_autocast_enabled("cpu") or torch.get_autocast_dtype("cpu") != torch.bfloat16
                or torch.compiler.is_compiling()):
            return None
        key = (weight.data_ptr(), weight._version)
        cached = self.__dict__.get("_bf16_cache")  # a plain attribute: in no state dict, never saved
        if cached is None or cached[0] != key:
            bias = None if self.bias is None else self.bias.detach().to(torch.bfloat16)
            cached = (key, weight.detach().to(torch.bfloat16), bias)
            self.__dict__["_bf16_cache"] = cached
        return cached[1], cached[2]

    def train(self, mode: bool = True) -> AtenLinear:
        # dropped at every mode switch: in-place edits through `.data` (PEFT's merge) leave `_version` unchanged
        self.__dict__.pop("_bf16_cache", None)
        return super().train(mode)

    def forward(self, x: Tensor) -> Tensor:
        operands = self._bf16_operands()
        if operands is not None:
            return F.linear(x, *operands)  # autocast casts x to bf16 as it would have; the weight is bf16 already
        return F.linear(x, self.weight, self.bias)


class OneDNNLinear(AtenLinear):
    """A linear layer whose float32 CPU products run on oneDNN; every other case is AtenLinear's."""

    def forward(self, x: Tensor) -> Tensor:
        # under torch.compile (compile_model) inductor plans the GEMMs itself and cannot lower this op's inputs
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and x.numel() > 0 and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()):
            return _OneDNNLinearFn.apply(x, self.weight, self.bias)
        return super().forward(x)


def onednn_available() -> bool:
    """oneDNN is compiled in and its linear op runs here (a tiny probe, so a torch without it falls back)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        _onednn_matmul(torch.ones(2, 3), torch.ones(4, 3), torch.zeros(4))
    except (RuntimeError, AttributeError):
        return False
    return True


Shape = tuple[int, int, bool]  # (in_features, out_features, weight trained)


def linear_shapes(model: nn.Module) -> dict[Shape, list[nn.Linear]]:
    """The model's plain float32 CPU linear layers grouped by shape and whether their weight trains."""
    groups: dict[Shape, list[nn.Linear]] = {}
    for module in model.modules():
        if type(module) in (nn.Linear, AtenLinear, OneDNNLinear) and module.weight.dtype == torch.float32 \
                and module.weight.device.type == "cpu":
            shape = (module.in_features, module.out_features, module.weight.requires_grad)
            groups.setdefault(shape, []).append(module)
    return groups


def _products(kind: str, x: Tensor, w: Tensor, dy: Tensor, trained: bool) -> None:
    """The products a training step runs for one layer: y = x W^T, dx = dy W, and dW = dy^T x when W trains."""
    if kind == "onednn":
        _onednn_matmul(x, w, None)
        _onednn_matmul(dy, w.t(), None)
        if trained:
            _onednn_matmul(dy.t(), x.t(), None)
    else:
        F.linear(x, w)
        dy.mm(w)
        if trained:
            dy.t().mm(x)


def time_kernels(shape: Shape, tokens: int = PROBE_TOKENS, min_repeats: int = PROBE_REPEATS,
                 budget_s: float = PROBE_BUDGET_S) -> dict[str, float]:
    """Seconds for one layer's step products per kernel: the fastest of several rounds that alternate the kernels
    (so a neighbour's burst slows both alike), after a warm-up that JITs oneDNN's kernel; small shapes get more
    rounds, up to `budget_s` per shape, since the minimum of many is what filters a busy machine out."""
    k, n, trained = shape
    x, w, dy = torch.randn(tokens, k), torch.randn(n, k), torch.randn(tokens, n)
    best = {"onednn": float("inf"), "aten": float("inf")}
    started, rounds = time.perf_counter(), 0
    with torch.no_grad():
        for kind in best:
            _products(kind, x, w, dy, trained)
        while rounds < min_repeats or (time.perf_counter() - started < budget_s and rounds < 50):
            for kind in best:
                start = time.perf_counter()
                _products(kind, x, w, dy, trained)
                best[kind] = min(best[kind], time.perf_counter() - start)
            rounds += 1
    return best


def cache_path() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "finetune" / "cpu_linear.json")


def machine_key() -> str:
    """What a measured choice holds for: the CPU model, torch's version and its thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def choose_kernels(shapes: list[Shape]) -> dict[Shape, str]:
    """The faster kernel per shape: from the cache when this machine measured it before, else measured now."""
    path, key = cache_path(), machine_key()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    known = dict(cache.get(key, {}))  # a copy: comparing it with the cache below must see what was added
    chosen: dict[Shape, str] = {}
    for shape in shapes:
        name = f"{shape[0]}x{shape[1]}{' trained' if shape[2] else ''}"
        if known.get(name) not in ("onednn", "aten"):
            times = time_kernels(shape)
            known[name] = min(times, key=times.get)
        chosen[shape] = known[name]
    if cache.get(key) != known:
        cache[key] = known
        try:  # a read-only home only costs the next run the probe again
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, path)
        except OSError:
            pass
    return chosen


def use_cpu_linear(model: nn.Module, kind: CpuLinear) -> dict[str, int]:
    """Route the model's plain linear layers through `kind`: "onednn", "aten", or "auto" (the faster per shape on
    this machine, see choose_kernels); returns how many layers run on each. oneDNN falls back to aten where it is
    not available."""
    if kind not in CPU_LINEARS:
        raise ValueError(f"unknown CPU linear kernel {kind!r}; choose one of {CPU_LINEARS}")
    groups = linear_shapes(model)
    if kind == "aten" or not onednn_available():
        chosen = dict.fromkeys(groups, "aten")
    elif kind == "onednn":
        chosen = dict.fromkeys(groups, "onednn")
    else:
        chosen = choose_kernels(sorted(groups))
    counts = {"onednn": 0, "aten": 0}
    for shape, layers in groups.items():
        for layer in layers:
            layer.__class__ = OneDNNLinear if chosen[shape] == "onednn" else AtenLinear
            counts[chosen[shape]] += 1
    return counts
