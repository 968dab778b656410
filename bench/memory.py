"""Memory of one training step of the real-size SmolVLA per base precision, with and without activation checkpointing.

    .venv/bin/python bench/memory.py                 # every mode, GC on and off, batch 2
    .venv/bin/python bench/memory.py --modes bf16_lora nf4_lora --batch-size 4

Each (mode, checkpointing) pair runs in its own process so peak memory is its own: CUDA peak allocated on a GPU,
peak resident memory sampled from /proc/self/statm every 5 ms during the step on the CPU (not ru_maxrss, which would
include building the model). Weights are random (same shapes as lerobot/smolvla_base); the numbers that matter -
bytes and peaks - do not depend on their values. Prints a table and each mode's ratio to bf16 + LoRA.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("bf16_lora", "int8_lora", "nf4_lora", "full_ft")


def build_policy(mode: str, device, checkpointing: bool):
    import torch

    from finetune.adapters import apply_adapter
    from finetune.config import PeftOptions, QuantOptions
    from finetune.policies import SmolVLAConfig, make_policy
    from finetune.policies import _materialize_buffers as materialize_buffers
    from finetune.quant import enable_input_require_grads, quantize_policy

    config = SmolVLAConfig(
        input_features={"observation.images.top": {"type": "VISUAL", "shape": [3, 512, 512]},
                        "observation.state": {"type": "STATE", "shape": [6]}},
        output_features={"action": {"type": "ACTION", "shape": [6]}},
    )
    torch.manual_seed(0)
    # Built on the meta device and materialized in its storage dtype, so building never holds an fp32 copy.
    with torch.device("meta"):
        policy = make_policy(config)
    policy = policy.to(torch.bfloat16 if mode != "full_ft" else torch.float32).to_empty(device="cpu")
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0.0, 0.02)
    materialize_buffers(policy)
    policy.set_gradient_checkpointing(checkpointing)
    if mode in ("int8_lora", "nf4_lora"):
        opts = QuantOptions(load_in_8bit=mode == "int8_lora", load_in_4bit=mode == "nf4_lora")
        policy = quantize_policy(policy, opts, device, keep=[])
        enable_input_require_grads(policy)
    else:
        policy = policy.to(device)
    frozen_bytes = _frozen_bytes(policy)
    if mode == "full_ft":
        return policy, frozen_bytes
    model = apply_adapter(policy, PeftOptions(r=64, lora_alpha=64))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model, frozen_bytes


def _frozen_bytes(policy) -> int:
    from finetune.quant import weight_bytes

    return weight_bytes(policy)


def make_batch(batch_size: int, device):
    import torch

    g = torch.Generator().manual_seed(0)
    batch = {
        "observation.images.top": torch.rand(batch_size, 3, 512, 512, generator=g),
        "observation.state": torch.randn(batch_size, 6, generator=g),
        "observation.language.tokens": torch.randint(0, 49000, (batch_size, 48), generator=g),
        "observation.language.attention_mask": torch.ones(batch_size, 48, dtype=torch.bool),
        "action": torch.randn(batch_size, 50, 6, generator=g),
        "action_is_pad": torch.zeros(batch_size, 50, dtype=torch.bool),
    }
    return {k: v.to(device) for k, v in batch.items()}


def worker(mode: str, checkpointing: bool, batch_size: int) -> dict:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, frozen_bytes = build_policy(mode, device, checkpointing)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(batch_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sampler = RssSampler().start()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss, _ = model(batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        kind = f"CUDA peak allocated ({torch.cuda.get_device_name()})"
    else:
        peak = sampler.stop()
        kind = "peak RSS during the step (CPU)"
    return {"mode": mode, "checkpointing": checkpointing, "frozen_bytes": frozen_bytes, "trainable": trainable,
            "peak_bytes": peak, "peak_kind": kind, "step_s": time.perf_counter() - start, "loss": loss.item()}


class RssSampler:
    """Peak resident memory over an interval, sampled from /proc every few milliseconds."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._running = interval, 0, False

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize()

    def _run(self) -> None:
        while self._running:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def start(self) -> RssSampler:
        self._running, self.peak = True, self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._running = False
        self._thread.join()
        return max(self.peak, self.rss())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "GC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1] == "on", args.batch_size)))
        return

    gcs = {"on": ["on"], "off": ["off"], "both": ["off", "on"]}[args.checkpointing]
    rows = []
    for mode in args.modes:
        for gc in gcs:
            cmd = [sys.executable, __file__, "--worker", mode, gc, "--batch-size", str(args.batch_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{mode} gc={gc}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"measured {mode} gc={gc}", file=sys.stderr)

    base = {r["checkpointing"]: r for r in rows if r["mode"] == "bf16_lora"}
    gib = 2**30
    print(f"\nSmolVLA 450M, one training step, batch {args.batch_size}, {rows[0]['peak_kind'] if rows else ''}")
    print(f"{'mode':<10} {'ckpt':<5} {'weights GiB':>10} {'x bf16':>7} {'trainable':>11} {'peak GiB':>9} {'x bf16':>7}"
          f" {'step s':>7}")
    for r in rows:
        ref = base.get(r["checkpointing"])
        fb = r["frozen_bytes"] / ref["frozen_bytes"] if ref else float("nan")
        pk = r["peak_bytes"] / ref["peak_bytes"] if ref else float("nan")
        print(f"{r['mode']:<10} {'on' if r['checkpointing'] else 'off':<5} {r['frozen_bytes'] / gib:>10.3f} {fb:>7.2f}"
              f" {r['trainable']:>11,} {r['peak_bytes'] / gib:>9.2f} {pk:>7.2f} {r['step_s']:>7.1f}")


if __name__ == "__main__":
    main()
