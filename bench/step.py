"""Time of one real-size LoRA training step per attention kernel and precision, against today's eager path.

    .venv/bin/python bench/step.py                                  # CPU: SmolVLA, batch 2 and 8, fp32/bf16, main/sdpa,
                                                                    #      aten/oneDNN linears
    .venv/bin/python bench/step.py --batch-sizes 2 --steps 2 --attn main eager sdpa --linears aten
    .venv/bin/python bench/step.py --gpu                            # CUDA: SmolVLA and pi0 on 8/4-bit bases, batch 8/32

CPU rows: the 450M SmolVLA in LeRobot's layout (random weights, fp32 storage), one 256x256 camera resized to 512 as
the policy does, 48 tokens, chunk 50, LoRA r 64 on LeRobot's default targets, AdamW; one step = forward, backward,
optimizer step. `precision` bf16 runs the step under bf16 autocast (weights stay fp32). Attention kernels:

- `main`: the code before SDPA landed: LeRobot's eager float32-softmax joint attention, SigLIP through transformers'
  SDPA (already its default), with torch's own linears - the baseline every ratio is taken against, per batch size;
- `eager`: eager attention everywhere (`--policy.attn-implementation eager`);
- `sdpa`: torch's scaled_dot_product_attention in the joint layers and SigLIP (the default).

Linear kernels (`linear`): `aten` is torch's own (MKL's sgemm on CPU, the baseline's), `onednn` the float32 linears
through oneDNN (`--policy.cpu-linear onednn`; finetune/policies/cpu_linear.py), `auto` the default: the faster of the
two per layer shape, measured on this machine and cached. Under bf16 autocast both
are torch's bf16 kernel, so bf16 rows run `aten` only.

`--without frozen-context bf16-cache` adds, for every row, the same row with one of the step's savings switched
off, to show what each is worth: `frozen-context` runs the joint pass over the whole prefix (LeRobot's way: every VLM
layer recorded by autograd over the images and text, and its backward run) instead of encoding the frozen context
first without autograd; `bf16-cache` lets autocast cast every frozen weight to bf16 at every call again.

The rows of one batch size run in one process, interleaved step by step (a busy neighbour slows every row alike);
each row's time is the median of `--steps` timed steps after `--warmup` untimed rounds. AdamW runs with lr 0 (its
arithmetic included), so every step sees the same weights and the rows' losses (same inputs, noise and time) show that
they compute the same thing. Peak RSS is the process's VmHWM from /proc, reset (clear_refs) before each step, so it is
the peak during that row's step (model and optimizer state included).

GPU rows (`--gpu`, needs CUDA): SmolVLA and pi0 (3.2B) LoRA r 64 on an 8-bit or 4-bit NF4 base, bf16 storage and
autocast, gradient checkpointing on (the qlora presets), SDPA; step time and CUDA peak allocated, with the card's name.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SEED = 0


def smolvla_config(image: int):
    from finetune.policies import SmolVLAConfig

    return SmolVLAConfig(
        input_features={"observation.images.top": {"type": "VISUAL", "shape": [3, image, image]},
                        "observation.state": {"type": "STATE", "shape": [6]}},
        output_features={"action": {"type": "ACTION", "shape": [6]}},
    )


def pi0_config():
    from finetune.policies import PI0Config

    return PI0Config(
        input_features={"observation.images.base_0_rgb": {"type": "VISUAL", "shape": [3, 224, 224]},
                        "observation.images.left_wrist_0_rgb": {"type": "VISUAL", "shape": [3, 224, 224]},
                        "observation.state": {"type": "STATE", "shape": [8]}},
        output_features={"action": {"type": "ACTION", "shape": [7]}},
    )


def build_policy(config, dtype):
    """Random weights in LeRobot's layout, built on the meta device and materialized in `dtype` (no fp32 copy)."""
    import torch

    from finetune.policies import _materialize_buffers as materialize_buffers
    from finetune.policies import make_policy

    torch.manual_seed(SEED)
    with torch.device("meta"):
        policy = make_policy(config)
    policy = policy.to(dtype).to_empty(device="cpu")
    for module in policy.modules():  # to_empty left non-persistent buffers (SigLIP's position ids, rotary tables)
        for name, buf in list(module.named_buffers(recurse=False)):  # uninitialized: rebuild them from the config
            if buf is not None and name in module._non_persistent_buffers_set:
                module.register_buffer(name, torch.empty_like(buf, device="meta"), persistent=False)
    keep = getattr(policy, "keep_in_float32", ())
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if any(s in name for s in keep):
                p.data = p.data.float()
            p.normal_(0.0, 0.02)
    materialize_buffers(policy)
    if hasattr(policy, "tie_weights"):
        policy.tie_weights()
    return policy


def make_batch(config, batch_size: int, image: int, device):
    import torch

    g = torch.Generator().manual_seed(SEED)
    batch = {key: torch.rand(batch_size, 3, image, image, generator=g) for key in config.image_features}
    batch["observation.state"] = torch.randn(batch_size, config.state_dim, generator=g)
    batch["observation.language.tokens"] = torch.randint(2, 49000, (batch_size, 48), generator=g)
    batch["observation.language.attention_mask"] = torch.ones(batch_size, 48, dtype=torch.bool)
    batch["action"] = torch.randn(batch_size, config.chunk_size, config.action_dim, generator=g)
    batch["action_is_pad"] = torch.zeros(batch_size, config.chunk_size, dtype=torch.bool)
    noise = torch.randn(batch_size, config.chunk_size, config.max_action_dim, generator=g)
    time_ = torch.rand(batch_size, generator=g) * 0.9 + 0.05
    return {k: v.to(device) for k, v in batch.items()}, noise.to(device), time_.to(device)


def set_kernels(policy, model, attn: str, linear: str) -> None:
    from finetune.policies.cpu_linear import use_cpu_linear

    set_attention(policy, attn)
    use_cpu_linear(model, linear)


def set_attention(policy, attn: str) -> None:
    from finetune.policies.common import set_vision_attn_implementation

    policy.set_attn_implementation("eager" if attn == "main" else attn)
    if attn == "main":  # before SDPA landed the joint layers were eager and SigLIP used transformers' default, SDPA
        vision = policy.model.vlm_with_expert.vlm.model.vision_model
        set_vision_attn_implementation(vision, "sdpa")


def set_variant(policy, model, variant: str) -> None:
    """Switch one of the step's savings off ("no-frozen-context", "no-bf16-cache") or keep them all ("default")."""
    from torch import nn

    from finetune.policies.cpu_linear import AtenLinear, OneDNNLinear

    policy.model.__dict__.pop("_frozen_context_length", None)
    if variant == "no-frozen-context":  # the joint pass (see FlowMatchingModel._denoise_full)
        policy.model._frozen_context_length = lambda prefix_att: 0
    if variant == "no-bf16-cache":  # plain nn.Linear: under autocast the same kernel, weights cast at every call
        for module in model.modules():
            if type(module) in (AtenLinear, OneDNNLinear):
                module.__dict__.pop("_bf16_cache", None)
                module.__class__ = nn.Linear


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def one_step(model, optimizer, batch, noise, time_, device, autocast_dtype) -> tuple[float, float]:
    """(loss, seconds) of one LoRA step: forward (under autocast when given), backward, optimizer step."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        loss, _ = model(batch, noise=noise, time=time_)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss.item(), time.perf_counter() - start


def cpu_worker(spec: dict) -> list[dict]:
    """All rows of one batch size in one process, interleaved step by step: a busy neighbour slows every row alike.

    AdamW runs with lr 0 (its arithmetic included), so every step of every row sees the same weights and the losses
    of the rows are comparable.
    """
    import statistics

    import torch

    from finetune.adapters import apply_adapter
    from finetune.config import PeftOptions

    device = torch.device("cpu")
    pi0 = spec.get("policy") == "pi0"  # pi0 (3.2B): bf16 storage, as a CPU or GPU run of it would hold it
    config = pi0_config() if pi0 else smolvla_config(256)
    policy = build_policy(config, torch.bfloat16 if pi0 else torch.float32)
    if pi0:
        policy.apply_storage_dtype(torch.bfloat16)
    model = apply_adapter(policy, PeftOptions(r=64, lora_alpha=64))
    for p in model.parameters():  # trained parameters in float32, as training keeps them
        if p.requires_grad:
            p.data = p.data.float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0, foreach=True)
    batch, noise, time_ = make_batch(config, spec["batch"], 224 if pi0 else 256, device)
    model.train()
    rows = {(precision, attn, linear, variant): {"batch": spec["batch"], "precision": precision, "attn": attn,
                                                 "linear": linear, "variant": variant, "times": [], "peaks": [],
                                                 "loss": None}
            for precision, attn, linear in spec["rows"] for variant in spec.get("variants", ["default"])}
    for step in range(spec["warmup"] + spec["steps"]):
        for (precision, attn, linear, variant), row in rows.items():
            set_kernels(policy, model, attn, linear)
            set_variant(policy, model, variant)
            reset_peak_rss()
            loss, seconds = one_step(model, optimizer, batch, noise, time_, device,
                                     torch.bfloat16 if precision == "bf16" else None)
            row["loss"] = loss
            if step >= spec["warmup"]:
                row["times"].append(seconds)
                row["peaks"].append(peak_rss())
    out = []
    for row in rows.values():
        times, peaks = row.pop("times"), row.pop("peaks")
        out.append({**row, "s_per_step": statistics.median(times), "peak_bytes": max(peaks),
                    "threads": torch.get_num_threads()})
    return out


def gpu_worker(spec: dict) -> dict:
    import torch

    from finetune.adapters import quantize_and_attach
    from finetune.config import PeftOptions, QuantOptions

    device = torch.device("cuda")
    config = smolvla_config(512) if spec["policy"] == "smolvla" else pi0_config()
    image = 512 if spec["policy"] == "smolvla" else 224
    policy = build_policy(config, torch.bfloat16)
    policy.set_gradient_checkpointing(True)
    if hasattr(policy, "apply_storage_dtype"):
        policy.apply_storage_dtype(torch.bfloat16)
    quant = QuantOptions(load_in_8bit=spec["quant"] == "8bit", load_in_4bit=spec["quant"] == "4bit")
    model = quantize_and_attach(policy, quant, PeftOptions(r=64, lora_alpha=64), device, trainable=True)
    model.to(device)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    batch, noise, time_ = make_batch(config, spec["batch"], image, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(spec["warmup"] + spec["steps"]):
        loss, seconds = one_step(model, optimizer, batch, noise, time_, device, torch.bfloat16)
        losses.append(loss)
        if step >= spec["warmup"]:
            times.append(seconds)
    return {**spec, "loss": losses[0], "s_per_step": sum(times) / len(times),
            "peak_bytes": torch.cuda.max_memory_allocated(), "device": torch.cuda.get_device_name()}


def run_worker(spec: dict):
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_table(rows: list[dict]) -> str:
    base = {r["batch"]: r for r in rows if (r["precision"], r["attn"], r["linear"], r.get("variant", "default"))
            == ("fp32", "main", "aten", "default")}
    lines = ["| batch | precision | attention | linear | variant | s/step | x main fp32 | peak RSS GiB | first loss |",
             "|-------|-----------|-----------|--------|---------|--------|-------------|--------------|------------|"]
    for r in rows:
        ref = base.get(r["batch"])
        ratio = f"{r['s_per_step'] / ref['s_per_step']:.2f}" if ref else "-"
        variant = r.get("variant", "default")
        lines.append(f"| {r['batch']} | {r['precision']} | {r['attn']} | {r['linear']} | {variant} | "
                     f"{r['s_per_step']:.2f} | "
                     f"{ratio} | "
                     f"{r['peak_bytes'] / 2**30:.2f} | {r['loss']:.6f} |")
    return "\n".join(lines)


def gpu_table(rows: list[dict]) -> str:
    lines = [f"device: {rows[0]['device']}" if rows else "",
             "| policy | base | batch | s/step | peak allocated GiB | first loss |",
             "|--------|------|-------|--------|--------------------|------------|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['quant']} | {r['batch']} | {r['s_per_step']:.3f} | "
                     f"{r['peak_bytes'] / 2**30:.2f} | {r['loss']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--attn", nargs="+", default=["main", "sdpa"], choices=["main", "eager", "sdpa"])
    parser.add_argument("--linears", nargs="+", default=["aten", "onednn", "auto"], choices=["aten", "onednn", "auto"],
                        help="CPU float32 linear kernels (bf16 rows always run aten); auto: measured per shape "
                             "(its one-time probe runs outside the timed steps)")
    parser.add_argument("--cpu-policy", default="smolvla", choices=["smolvla", "pi0"],
                        help="the CPU rows' policy; pi0 (3.2B, bf16 storage) takes --attn sdpa and --precisions bf16")
    parser.add_argument("--without", nargs="+", default=[], choices=["frozen-context", "bf16-cache"],
                        help="also time every row with this saving switched off")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row before timing")
    parser.add_argument("--gpu", action="store_true", help="the CUDA rows (SmolVLA and pi0 on 8/4-bit bases)")
    parser.add_argument("--policies", nargs="+", default=["smolvla", "pi0"], choices=["smolvla", "pi0"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(gpu_worker(spec) if spec.get("gpu") else cpu_worker(spec)))
        return

    rows = []
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        for policy in args.policies:
            for quant in ("8bit", "4bit"):
                for batch in args.batch_sizes or [8, 32]:
                    spec = {"gpu": True, "policy": policy, "quant": quant, "batch": batch, "steps": args.steps,
                            "warmup": args.warmup}
                    rows.append(run_worker(spec))
                    print(json.dumps(rows[-1]), flush=True)
        print(gpu_table(rows))
        return
    # the baseline first, then the rest; each batch size in its own process
    baseline = ("fp32", "main", "aten") if args.cpu_policy == "smolvla" else (args.precisions[0], "sdpa", "aten")
    order = [baseline] + [(p, a, lin) for p in args.precisions for a in args.attn
                          for lin in (args.linears if p == "fp32" else ["aten"]) if (p, a, lin) != baseline]
    for batch in args.batch_sizes or [2, 8]:
        spec = {"batch": batch, "rows": order, "steps": args.steps, "warmup": args.warmup,
                "variants": ["default"] + [f"no-{name}" for name in args.without], "policy": args.cpu_policy}
        for row in run_worker(spec):
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(cpu_table(rows))


if __name__ == "__main__":
    main()
