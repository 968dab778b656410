"""Our real-size SmolVLA LoRA step against LeRobot's own, alternated step by step (issue 24).

    .venv/bin/python bench/vs_lerobot.py                                    # batch 2 and 8, fp32 and bf16
    .venv/bin/python bench/vs_lerobot.py --batch-sizes 2 --precisions fp32 --steps 1 --warmup 0    # smoke run
    .venv/bin/python bench/vs_lerobot.py --lerobot-python ../other/.lerobot-venv/bin/python --threads 1

LeRobot's side is LeRobot 0.6.1 itself, the version this project supports (issue 24 named 0.3.2), run by the python of
the venv tools/lerobot_env.sh builds (.lerobot-venv in the repository root; `--lerobot-python` or LEROBOT_PYTHON
point elsewhere). Each side is one long-lived process that builds its model once and then answers step requests (JSON
lines on stdin/stdout); the parent alternates them, ours then LeRobot's, for every warm-up and timed step of a row, so
a busy neighbour slows both alike.

Both sides: the 450M SmolVLA (SmolVLM2-500M truncated to 16 layers, expert at 0.75 width) with random weights, fp32
storage; one 256x256 camera resized to 512 as the policy does, state 6, action 6, 48 tokens, chunk 50; LoRA r 64
(alpha 64) on LeRobot's default SmolVLA targets (the expert's q/v projections and the state/action/time
projections), attached by each side's own code (our apply_adapter, LeRobot's wrap_with_peft). Both build the same
batch, noise and time (bench/step.py's make_batch, seed 0; checked by a checksum) and run the same step
(bench/step.py's one_step: forward, under bf16 autocast for `bf16` rows with weights kept fp32, backward, AdamW step;
no gradient clipping on either side), each with its own trainer's AdamW at lr 0 (its arithmetic included, weights
unchanged): ours with foreach (finetune/training/optim.py), LeRobot's preset as lerobot-train builds it (torch's
per-tensor loop on CPU). `--threads` intra-op threads on both sides (and OMP_NUM_THREADS).

What differs is each codebase as it trains by default: ours with SDPA attention and `--policy.cpu-linear auto` (the
faster of MKL and oneDNN per linear shape, probed before timing); LeRobot's eager float32-softmax joint attention,
SigLIP on transformers' default (SDPA), torch's linears. The random weights differ too (ours N(0, 0.02) as in
bench/step.py, built on the meta device; LeRobot's its own constructor with load_vlm_weights=False), so the losses
only show that both steps ran; parameter counts, total and trainable, must be equal and are checked.

LeRobot builds the backbone from AutoConfig/AutoProcessor.from_pretrained(vlm_model_name), which needs the Hub for
SmolVLM2's id. Offline, our process writes our real-size SmolVLM config as a vlm/ folder (write_vlm_folder of
finetune/export/lerobot_vlm.py: config, processor files, and a small BPE tokenizer carrying SmolVLM's image tokens;
the batch's token ids are random and LeRobot only reads the tokenizer's image-token ids) and LeRobot is given its path.
After building, both processes hand freed heap back to the OS (malloc_trim), so build-time memory is not counted.

Columns: `LeRobot s` and `ours s` are medians of `--steps` timed steps after `--warmup` untimed ones; `ours/LeRobot`
their ratio (below 1: ours is faster; issue 24 asks for 0.9); `peak RSS` is each process's VmHWM from /proc, reset
(clear_refs) before each step, the max over the row's timed steps: model, optimizer state and the step's activations;
`loss` the last step's. The table is headed by the CPU model, the threads and both torch versions; the rows and every
sample go to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.step import make_batch, one_step, peak_rss, reset_peak_rss  # noqa: E402

CAMERA = "observation.images.top"
IMAGE = 256
STATE_DIM = ACTION_DIM = 6
RANK = 64
SEED = 0
SIDES = ("ours", "lerobot")
LEROBOT_PYTHON = Path(os.environ.get("LEROBOT_PYTHON", ROOT / ".lerobot-venv" / "bin" / "python"))


# ---- inside a worker process (ours: the project's venv; lerobot: LeRobot's venv, never importing finetune) ----

class Side:
    """One side's model, optimizer and batches; `step` runs and measures one training step."""

    def __init__(self, model, optimizer, features: SimpleNamespace, info: dict[str, Any]):
        self.model, self.optimizer, self.features, self.info = model, optimizer, features, info
        self.batches: dict[int, tuple] = {}

    def step(self, batch: int, precision: str) -> dict[str, Any]:
        import torch

        if batch not in self.batches:
            inputs, noise, time_ = make_batch(self.features, batch, IMAGE, torch.device("cpu"))
            checksum = sum(float(t.double().sum()) for t in [*inputs.values(), noise, time_])
            self.batches[batch] = inputs, noise, time_, checksum
        inputs, noise, time_, checksum = self.batches[batch]
        reset_peak_rss()
        loss, seconds = one_step(self.model, self.optimizer, dict(inputs), noise, time_, torch.device("cpu"),
                                 torch.bfloat16 if precision == "bf16" else None)
        return {"seconds": seconds, "loss": loss, "peak_bytes": peak_rss(), "batch_checksum": checksum}


def describe(model, optimizer, threads: int) -> dict[str, Any]:
    import torch

    optimizer.param_groups[0]["lr"] = 0.0  # AdamW's arithmetic runs, the weights stay as they are
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"trainable_params": sum(p.numel() for p in trainable), "total_params":
            sum(p.numel() for p in model.parameters()), "trainable_tensors": len(trainable),
            "dtypes": sorted({str(p.dtype) for p in model.parameters()}), "torch": torch.__version__,
            "threads": threads}


def build_ours(threads: int, vlm_parent: Path) -> Side:
    """Our policy as training runs it (SDPA, cpu-linear auto) and, for LeRobot, its backbone as a vlm/ folder."""
    import torch

    from bench.step import build_policy, smolvla_config
    from finetune.adapters import apply_adapter
    from finetune.config import PeftOptions
    from finetune.policies.cpu_linear import use_cpu_linear

    torch.set_num_threads(threads)
    config = smolvla_config(IMAGE)
    policy = build_policy(config, torch.float32)
    policy.set_attn_implementation("sdpa")
    model = apply_adapter(policy, PeftOptions(r=RANK, lora_alpha=RANK))
    linears = use_cpu_linear(model, "auto")  # probes (or reads the cached choice) now, outside the timed steps
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=True)
    vlm = write_vlm(policy, vlm_parent)
    info = {**describe(model, optimizer, threads), "linears": linears, "vlm": str(vlm)}
    return Side(model, optimizer, config, info)


def write_vlm(policy, parent: Path) -> Path:
    """parent/vlm: our real-size SmolVLM config, its processor files and a small tokenizer, loadable by LeRobot."""
    from transformers import AutoTokenizer

    from finetune.demo import train_tokenizer
    from finetune.export.lerobot_vlm import write_vlm_folder

    tokenizer = AutoTokenizer.from_pretrained(str(train_tokenizer(parent / "tokenizer")))
    return write_vlm_folder(parent, policy, tokenizer)


def build_lerobot(threads: int, vlm: str) -> Side:
    """LeRobot 0.6.1's SmolVLAPolicy (load_vlm_weights=False: random weights) and its own PEFT wrapping."""
    import lerobot
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    config = SmolVLAConfig(
        input_features={CAMERA: PolicyFeature(type=FeatureType.VISUAL, shape=(3, IMAGE, IMAGE)),
                        "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))},
        vlm_model_name=vlm, load_vlm_weights=False, device="cpu",
    )
    config.pretrained_path = Path(vlm)  # wrap_with_peft refuses a policy without one; it only names the base
    policy = SmolVLAPolicy(config)
    model = policy.wrap_with_peft(peft_cli_overrides={"r": RANK, "lora_alpha": RANK})
    optimizer = config.get_optimizer_preset().build([p for p in model.parameters() if p.requires_grad])
    features = SimpleNamespace(image_features=list(config.image_features), state_dim=STATE_DIM,
                               action_dim=ACTION_DIM, chunk_size=config.chunk_size,
                               max_action_dim=config.max_action_dim)
    info = {**describe(model, optimizer, threads), "lerobot": lerobot.__version__}
    return Side(model, optimizer, features, info)


def serve(side: str, threads: int, where: str) -> None:
    """Build the model, report it in one JSON line, then answer one JSON line per request until stdin closes."""
    import ctypes

    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr: stdout carries the protocol only
    built = build_ours(threads, Path(where)) if side == "ours" else build_lerobot(threads, where)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the build's freed memory (LeRobot drops 16 of 32 layers) leaves RSS
    protocol.write(json.dumps(built.info) + "\n")
    for line in sys.stdin:
        protocol.write(json.dumps(built.step(**json.loads(line))) + "\n")


# ---- the parent ----

class Worker:
    """A side's process: started with its python, spoken to in JSON lines; its stderr goes to a log file."""

    def __init__(self, side: str, python: str, threads: int, where: str, log: Path):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if side == "lerobot":
            env["PYTHONPATH"] = ""  # LeRobot's venv; the torchvision stand-in is inside its site-packages
        self.side, self.log = side, log
        self.proc = subprocess.Popen([python, __file__, "--worker", side, "--threads", str(threads), "--where", where],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                     cwd=ROOT, env=env)
        self.info = self.read()

    def read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            tail = self.log.read_text()[-3000:]
            raise SystemExit(f"error: the {self.side} worker exited ({self.proc.returncode}):\n{tail}")
        return json.loads(line)

    def request(self, **message) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def run_row(workers: dict[str, Worker], batch: int, precision: str, warmup: int, steps: int) -> dict[str, Any]:
    """One configuration: ours, LeRobot's, ours, ... for every warm-up and timed step; medians of the timed ones."""
    samples: dict[str, list[dict]] = {side: [] for side in SIDES}
    for step in range(warmup + steps):
        for side in SIDES:
            result = workers[side].request(batch=batch, precision=precision)
            if step >= warmup:
                samples[side].append(result)
    row: dict[str, Any] = {"batch": batch, "precision": precision}
    for side in SIDES:
        row[f"{side}_s"] = statistics.median(s["seconds"] for s in samples[side])
        row[f"{side}_peak_bytes"] = max(s["peak_bytes"] for s in samples[side])
        row[f"{side}_loss"] = samples[side][-1]["loss"]
    row["ratio"] = row["ours_s"] / row["lerobot_s"]
    checksums = {samples[side][-1]["batch_checksum"] for side in SIDES}
    row["same_batch"] = len(checksums) == 1
    row["samples"] = samples
    return row


def table(cpu: str, info: dict[str, dict], rows: list[dict]) -> str:
    ours, theirs = info["ours"], info["lerobot"]
    params = (f"{ours['trainable_params']:,}" if ours["trainable_params"] == theirs["trainable_params"] else
              f"UNEQUAL: ours {ours['trainable_params']:,}, LeRobot {theirs['trainable_params']:,}")
    linears = ours["linears"]
    lines = [f"CPU: {cpu}; {ours['threads']} threads; torch {ours['torch']} (ours), {theirs['torch']} "
             f"(LeRobot {theirs['lerobot']}); trainable parameters (both): {params}; our linears (auto): "
             f"{linears['onednn']} oneDNN, {linears['aten']} MKL",
             "",
             "| batch | precision | LeRobot s | ours s | ours/LeRobot | LeRobot peak RSS GiB | ours peak RSS GiB | "
             "LeRobot loss | ours loss |",
             "|-------|-----------|-----------|--------|--------------|----------------------|-------------------|"
             "--------------|-----------|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['precision']} | {r['lerobot_s']:.2f} | {r['ours_s']:.2f} | "
                     f"{r['ratio']:.2f} | {r['lerobot_peak_bytes'] / 2**30:.2f} | {r['ours_peak_bytes'] / 2**30:.2f} | "
                     f"{r['lerobot_loss']:.4f} | {r['ours_loss']:.4f} |")
    return "\n".join(lines)


def check_same_model(info: dict[str, dict]) -> list[str]:
    """The two sides must train the same number of parameters on a model of the same size."""
    ours, theirs = info["ours"], info["lerobot"]
    return [f"warning: {key} differ: ours {ours[key]:,}, LeRobot {theirs[key]:,}"
            for key in ("trainable_params", "total_params", "trainable_tensors") if ours[key] != theirs[key]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row and side (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row and side before timing")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of each side")
    parser.add_argument("--lerobot-python", type=Path, default=LEROBOT_PYTHON,
                        help="python of a venv with LeRobot 0.6.1 (tools/lerobot_env.sh builds .lerobot-venv)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "vs_lerobot.json", help="JSON results")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--where", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        serve(args.worker, args.threads, args.where)
        return
    if not args.lerobot_python.is_file():
        raise SystemExit(f"error: no LeRobot environment at {args.lerobot_python}: build it with "
                         "tools/lerobot_env.sh (or pass --lerobot-python / set LEROBOT_PYTHON)")
    cpu = cpu_name()
    with tempfile.TemporaryDirectory(prefix="vs_lerobot_") as tmp:
        workers: dict[str, Worker] = {}
        try:  # one model is built at a time: ours first, which also writes the vlm/ folder LeRobot builds from
            workers["ours"] = Worker("ours", sys.executable, args.threads, tmp, Path(tmp, "ours.log"))
            workers["lerobot"] = Worker("lerobot", str(args.lerobot_python), args.threads,
                                        workers["ours"].info["vlm"], Path(tmp, "lerobot.log"))
            info = {side: w.info for side, w in workers.items()}
            print(json.dumps(info), flush=True)
            for warning in check_same_model(info):
                print(warning, file=sys.stderr)
            rows = []
            for batch in args.batch_sizes:
                for precision in args.precisions:
                    rows.append(run_row(workers, batch, precision, args.warmup, args.steps))
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "samples"}), flush=True)
                    if not rows[-1]["same_batch"]:
                        print("warning: the two sides' batches differ (checksums)", file=sys.stderr)
        finally:
            for worker in workers.values():
                worker.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "info": info, "rows": rows}, indent=1) + "\n")
    print(table(cpu, info, rows))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
