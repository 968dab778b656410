"""float32 linear layers through oneDNN on CPU: the same products and gradients as torch's, in the policies too."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import set_up_run, tiny_batch, train_args
from test_policies import randomize_lora_b
from torch import nn

from finetune.adapters import apply_adapter
from finetune.config import PeftOptions
from finetune.inference.loading import load_trained_policy
from finetune.policies import load_policy
from finetune.policies.cpu_linear import AtenLinear, OneDNNLinear, onednn_available, use_cpu_linear

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch has no oneDNN linear")


def grads_of(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(upstream)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["3d", "transposed"])
def test_onednn_linear_matches_float64_products_and_gradients(bias, layout):
    torch.manual_seed(0)
    dense = nn.Linear(96, 80, bias=bias)
    x = torch.randn(2, 37, 96) if layout == "3d" else torch.randn(96, 37).t()  # a strided input view
    upstream = torch.randn(*x.shape[:-1], 80)
    fast = nn.Linear(96, 80, bias=bias)
    fast.load_state_dict(dense.state_dict())
    assert use_cpu_linear(fast, "onednn") == {"onednn": 1, "aten": 0} and type(fast) is OneDNNLinear
    exact = nn.Linear(96, 80, bias=bias).double()
    exact.load_state_dict({k: v.double() for k, v in dense.state_dict().items()})

    y, gx, gp = grads_of(fast, x, upstream)
    y64, gx64, gp64 = grads_of(exact, x.double(), upstream.double())
    y32, gx32, _ = grads_of(dense, x, upstream)
    # float32 rounding against float64, no worse than torch's own kernel's error (a wrong product is off by O(1))
    for ours, ref, torch32 in ((y, y64, y32), (gx, gx64, gx32)):
        err, torch_err = (ours.double() - ref).abs().max().item(), (torch32.double() - ref).abs().max().item()
        assert err < max(4 * torch_err, 1e-5), (err, torch_err)
    assert set(gp) == ({"weight", "bias"} if bias else {"weight"})
    for name, grad in gp.items():
        torch.testing.assert_close(grad.double(), gp64[name], rtol=1e-5, atol=1e-5)


def test_frozen_weight_saves_no_input_and_gets_no_gradient():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    layer.weight.requires_grad_(False)
    use_cpu_linear(layer, "onednn")
    x = torch.randn(5, 16, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(5, 16))  # d(sum(xW^T+b))/dx = column sums of W


def test_other_dtypes_and_autocast_take_torchs_linear():
    torch.manual_seed(0)
    layer = nn.Linear(32, 8)
    ref = nn.Linear(32, 8)
    ref.load_state_dict(layer.state_dict())
    use_cpu_linear(layer, "onednn")
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = layer(x), ref(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected)  # the very same kernel as torch's under autocast
    layer.bfloat16(), ref.bfloat16()
    assert torch.equal(layer(x.bfloat16()), ref(x.bfloat16()))


@pytest.mark.parametrize("kind", ["aten", "onednn"])
def test_frozen_weight_is_cast_to_bf16_once_while_training_under_autocast(kind):
    torch.manual_seed(0)
    layer, ref = nn.Linear(32, 8), nn.Linear(32, 8)
    ref.load_state_dict(layer.state_dict())
    layer.weight.requires_grad_(False), ref.weight.requires_grad_(False)
    use_cpu_linear(layer, kind)
    x = torch.randn(4, 32, requires_grad=True)
    casts = []
    real_to = torch.Tensor.to

    def counting_to(tensor, *args, **kwargs):
        if tensor is layer.weight or tensor._base is layer.weight or tensor.data_ptr() == layer.weight.data_ptr():
            casts.append(args)
        return real_to(tensor, *args, **kwargs)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ref(x)
        torch.Tensor.to = counting_to
        try:
            outs = [layer(x) for _ in range(3)]
        finally:
            torch.Tensor.to = real_to
    assert len(casts) == 1  # autocast would cast the weight at each of the 3 calls
    for out in outs:
        assert out.dtype == torch.bfloat16 and torch.equal(out, expected)  # the same rounding as autocast's cast
    sum(o.float().sum() for o in outs).backward()  # the input still gets its gradient, through the bf16 weight
    torch.testing.assert_close(x.grad, ref.weight.bfloat16().float().sum(0).expand(4, 32).mul(3), rtol=1e-2,
                               atol=1e-2)

    with torch.no_grad():
        layer.weight.add_(1.0), ref.weight.add_(1.0)  # an in-place change bumps the version: cast again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), ref(x))
    layer.weight.data += 1.0  # `.data` keeps the version (as PEFT's merge does); a mode switch drops the copy
    ref.weight.data += 1.0
    layer.eval().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), ref(x))
    assert "_bf16_cache" not in layer.state_dict() and "_bf16_cache" in layer.__dict__
    layer.eval()  # eval mode (and a trained weight) keeps autocast's own cast
    assert "_bf16_cache" not in layer.__dict__
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), ref(x)) and "_bf16_cache" not in layer.__dict__


def test_switch_is_reversible_keeps_state_dict_and_leaves_subclasses_alone():
    class Quantized(nn.Linear):  # stands for bitsandbytes' layers, nn.Linear subclasses with their own forward
        pass

    model = nn.Sequential(nn.Linear(4, 4), Quantized(4, 4), nn.Sequential(nn.Linear(4, 2)))
    keys = list(model.state_dict())
    assert use_cpu_linear(model, "onednn") == {"onednn": 2, "aten": 0}
    assert [type(m).__name__ for m in model.modules() if isinstance(m, nn.Linear)] == \
        ["OneDNNLinear", "Quantized", "OneDNNLinear"]
    assert list(model.state_dict()) == keys
    assert use_cpu_linear(model, "onednn") == {"onednn": 2, "aten": 0}  # again: nothing changes
    assert use_cpu_linear(model, "aten") == {"onednn": 0, "aten": 2}
    assert [type(m).__name__ for m in model.modules() if isinstance(m, nn.Linear)] == \
        ["AtenLinear", "Quantized", "AtenLinear"]
    with pytest.raises(ValueError, match="unknown CPU linear kernel 'mkl'"):
        use_cpu_linear(model, "mkl")


def lora_loss_and_grads(model, batch, kind: str, checkpointing: bool = False):
    use_cpu_linear(model, kind)
    model.base_model.model.set_gradient_checkpointing(checkpointing)
    model.zero_grad(set_to_none=True)
    noise = torch.randn(3, model.base_model.model.config.chunk_size, 32, generator=torch.Generator().manual_seed(1))
    loss = model.train()(batch, noise=noise, time=torch.full((3,), 0.6))[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_smolvla_lora_step_on_onednn_equals_torchs(policy_dir, checkpointing):
    torch.manual_seed(0)
    model = apply_adapter(load_policy(policy_dir), PeftOptions(r=8))
    randomize_lora_b(model)  # LoRA B starts at zero; random B makes every A gradient non-zero
    batch = tiny_batch(model.base_model.model)
    loss_aten, grads_aten = lora_loss_and_grads(model, batch, "aten", checkpointing)
    loss_fast, grads_fast = lora_loss_and_grads(model, batch, "onednn", checkpointing)
    switched = [n for n, m in model.named_modules() if type(m) is OneDNNLinear]
    assert any(n.endswith("q_proj.base_layer") for n in switched) and any("lora_A" in n for n in switched)
    assert any("vision_model" in n for n in switched)
    torch.testing.assert_close(loss_fast, loss_aten, rtol=1e-5, atol=1e-6)
    assert set(grads_fast) == set(grads_aten) and len(grads_aten) > 0
    for name, grad in grads_aten.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_fast[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_training_and_inference_use_the_configured_kernel(policy_dir, dataset_root, lora_run, tmp_path,
                                                          monkeypatch):
    from finetune.policies import cpu_linear

    monkeypatch.setenv(cpu_linear.CACHE_ENV, str(tmp_path / "cpu_linear.json"))
    run = set_up_run(train_args(policy_dir, dataset_root, tmp_path / "auto"))  # the default: measured per shape
    measured = json.loads((tmp_path / "cpu_linear.json").read_text())
    chosen = next(iter(measured.values()))
    for module in run.model.modules():
        if type(module) in (AtenLinear, OneDNNLinear):
            shape = f"{module.in_features}x{module.out_features}{' trained' if module.weight.requires_grad else ''}"
            assert (type(module) is OneDNNLinear) == (chosen[shape] == "onednn"), shape
    run = set_up_run(train_args(policy_dir, dataset_root, tmp_path / "a", "--policy.cpu-linear", "onednn"))
    assert sum(type(m) is OneDNNLinear for m in run.model.modules()) > 100
    run = set_up_run(train_args(policy_dir, dataset_root, tmp_path / "b", "--policy.cpu-linear", "aten"))
    assert not any(type(m) is OneDNNLinear for m in run.model.modules())

    model, _ = load_trained_policy(lora_run / "checkpoints" / "last", None, torch.device("cpu"), torch.float32)
    measured = json.loads((tmp_path / "cpu_linear.json").read_text())[cpu_linear.machine_key()]
    for module in model.modules():  # inference measures too (the shapes it runs), and follows the measurement
        if type(module) in (AtenLinear, OneDNNLinear):
            shape = f"{module.in_features}x{module.out_features}{' trained' if module.weight.requires_grad else ''}"
            assert (type(module) is OneDNNLinear) == (measured[shape] == "onednn"), shape
    use_cpu_linear(model, "onednn")
    batch = tiny_batch(model)
    noise = torch.randn(3, model.config.chunk_size, 32, generator=torch.Generator().manual_seed(2))
    fast = model.eval().predict_action_chunk(batch, noise=noise)
    use_cpu_linear(model, "aten")
    torch.testing.assert_close(fast, model.predict_action_chunk(batch, noise=noise), rtol=1e-5, atol=1e-5)


def test_auto_measures_each_shape_once_per_machine_and_follows_the_measurement(tmp_path, monkeypatch):
    """auto times both kernels on each (in, out, trained) shape, keeps the faster, and caches it: a later model on
    the same machine (CPU model, torch version, threads) is not timed again, and its layers follow the cache."""
    from finetune.policies import cpu_linear

    monkeypatch.setenv(cpu_linear.CACHE_ENV, str(tmp_path / "cpu_linear.json"))
    timed = []
    original = cpu_linear.time_kernels
    monkeypatch.setattr(cpu_linear, "time_kernels", lambda shape: timed.append(shape) or original(shape))
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64), nn.Linear(64, 32))
    model[2].weight.requires_grad_(False)
    counts = use_cpu_linear(model, "auto")
    assert sorted(timed) == sorted([(64, 32, True), (32, 64, True), (64, 32, False)])
    assert sum(counts.values()) == 3
    cache = json.loads((tmp_path / "cpu_linear.json").read_text())[cpu_linear.machine_key()]
    assert set(cache) == {"64x32 trained", "32x64 trained", "64x32"} and set(cache.values()) <= {"onednn", "aten"}
    assert [type(m) is OneDNNLinear for m in model] == [cache[n] == "onednn"
                                                         for n in ("64x32 trained", "32x64 trained", "64x32")]

    timed.clear()  # a second model on this machine: the cache decides, nothing is timed
    forced = {"64x32 trained": "aten", "32x64 trained": "onednn", "64x32": "onednn"}
    (tmp_path / "cpu_linear.json").write_text(json.dumps({cpu_linear.machine_key(): forced}))
    again = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 64))
    assert use_cpu_linear(again, "auto") == {"onednn": 1, "aten": 1} and timed == []
    assert [type(m) for m in again] == [AtenLinear, OneDNNLinear]

    bigger = nn.Sequential(nn.Linear(64, 32), nn.Linear(48, 16))  # a model with a new shape on the same machine
    use_cpu_linear(bigger, "auto")
    assert timed == [(48, 16, True)]  # only the new shape is timed, and it joins the cache for the next run
    cache = json.loads((tmp_path / "cpu_linear.json").read_text())[cpu_linear.machine_key()]
    assert set(cache) == {*forced, "48x16 trained"} and cache["64x32 trained"] == "aten"


def test_a_kernel_that_is_twice_as_slow_is_not_chosen(tmp_path, monkeypatch):
    from finetune.policies import cpu_linear

    monkeypatch.setenv(cpu_linear.CACHE_ENV, str(tmp_path / "cache.json"))
    monkeypatch.setattr(cpu_linear, "time_kernels", lambda shape: {"onednn": 2e-3, "aten": 1e-3})
    layer = nn.Linear(8, 8)
    assert use_cpu_linear(layer, "auto") == {"onednn": 0, "aten": 1} and type(layer) is AtenLinear
