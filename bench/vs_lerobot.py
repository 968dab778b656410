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

What differs is each codebase as it trains by default: ours with `--policy.attn-implementation auto` (SDPA; eager in
the joint layers for bf16 rows), `--policy.cpu-linear auto` (the faster of MKL and oneDNN per linear shape, probed
before timing) and malloc keeping freed memory (finetune/training/cpu_memory.py); LeRobot's eager float32-softmax
joint attention, SigLIP on transformers' default (SDPA), torch's linears. The random weights differ too (ours
N(0, 0.02) as in bench/step.py, built on the meta device; LeRobot's its own constructor with load_vlm_weights=False),
so the losses only show that both steps ran; parameter counts, total and trainable, must be equal and are checked.

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

    def __init__(self, model, optimizer, features: SimpleNamespace, info: dict[str, Any], attention=None):
        self.model, self.optimizer, self.features, self.info = model, optimizer, features, info
        self.attention = attention  # ours: precision -> policy set to what training's auto picks for it
        self.batches: dict[int, tuple] = {}

    def step(self, batch: int, precision: str, profile: bool = False) -> dict[str, Any]:
        import torch

        if batch not in self.batches:
            inputs, noise, time_ = make_batch(self.features, batch, IMAGE, torch.device("cpu"))
            checksum = sum(float(t.double().sum()) for t in [*inputs.values(), noise, time_])
            self.batches[batch] = inputs, noise, time_, checksum
        inputs, noise, time_, checksum = self.batches[batch]
        if self.attention is not None:
            self.attention(precision)
        autocast = torch.bfloat16 if precision == "bf16" else None
        if profile:
            return profile_step(self.model, self.optimizer, dict(inputs), noise, time_, autocast)
        reset_peak_rss()
        loss, seconds = one_step(self.model, self.optimizer, dict(inputs), noise, time_, torch.device("cpu"), autocast)
        return {"seconds": seconds, "loss": loss, "peak_bytes": peak_rss(), "batch_checksum": checksum}


# Where a step's CPU time goes, by operator (self time, so nothing is counted twice). The names cover both sides:
# torch's linears (MKL), oneDNN's, attention as SDPA or as LeRobot's eager matmul + softmax, AdamW's kernels.
OP_GROUPS = (
    ("linear layers", ("aten::addmm", "aten::mm", "mkldnn::_linear_pointwise", "aten::mkldnn_linear",
                       "aten::_mkl_linear", "onednn", "aten::linear_backward")),
    ("attention", ("scaled_dot_product", "aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::softmax",
                   "aten::_softmax_backward_data", "flash_attention", "aten::masked_fill", "aten::where")),
    ("convolution (patch embedding)", ("convolution", "aten::mkldnn_convolution", "aten::_slow_conv2d")),
    ("optimizer (AdamW)", ("_foreach", "aten::addcdiv", "aten::addcmul", "aten::lerp", "aten::sqrt",
                           "aten::_fused_adam")),
    ("normalization", ("layer_norm", "rms_norm", "aten::rsqrt", "aten::pow", "aten::mean", "aten::var")),
    ("activations", ("gelu", "silu", "aten::tanh", "aten::sigmoid", "aten::mul", "aten::add", "aten::sub",
                     "aten::div", "aten::neg", "aten::cos", "aten::sin", "aten::exp")),
    ("data movement (copies, casts, layout)", ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous",
                                              "aten::index", "aten::_to_copy", "aten::fill_", "aten::zero_",
                                              "aten::stack", "aten::upsample", "aten::pad", "aten::constant_pad",
                                              "aten::embedding", "aten::gather", "aten::scatter")),
)


def op_group(name: str) -> str:
    for group, patterns in OP_GROUPS:
        if any(p in name for p in patterns):
            return group
    return "other"


def profile_step(model, optimizer, inputs, noise, time_, autocast) -> dict[str, Any]:
    """One step with its phases timed apart (forward, backward, optimizer) and a second one under torch.profiler,
    its operators' self CPU time summed by OP_GROUPS."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    phases = {}
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        loss, _ = model(inputs, noise=noise, time=time_)
    phases["forward"] = time.perf_counter() - start
    start = time.perf_counter()
    loss.backward()
    phases["backward"] = time.perf_counter() - start
    start = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    phases["optimizer"] = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss, _ = model(inputs, noise=noise, time=time_)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    groups: dict[str, float] = {}
    top: list[tuple[str, float]] = []
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        groups[op_group(event.key)] = groups.get(op_group(event.key), 0.0) + seconds
        top.append((event.key, seconds))
    top.sort(key=lambda kv: -kv[1])
    return {"phases": phases, "groups": groups, "top_ops": top[:15]}


def describe(model, optimizer, threads: int) -> dict[str, Any]:
    import torch

    optimizer.param_groups[0]["lr"] = 0.0  # AdamW's arithmetic runs, the weights stay as they are
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {"trainable_params": sum(p.numel() for p in trainable), "total_params":
            sum(p.numel() for p in model.parameters()), "trainable_tensors": len(trainable),
            "dtypes": sorted({str(p.dtype) for p in model.parameters()}), "torch": torch.__version__,
            "threads": threads}


def build_ours(threads: int, vlm_parent: Path, compile_model: bool = False) -> Side:
    """Our policy as training runs it (SDPA, cpu-linear auto) and, for LeRobot, its backbone as a vlm/ folder;
    `compile_model`: the model under torch.compile (inductor), compiled by the first step."""
    import torch

    from bench.step import build_policy, smolvla_config
    from finetune.adapters import apply_adapter
    from finetune.config import PeftOptions
    from finetune.policies.cpu_linear import use_cpu_linear

    torch.set_num_threads(threads)
    if os.environ.get("BENCH_KEEP_FREED_MEMORY", "1") == "1":  # as training on CPU does (training/cpu_memory.py)
        from finetune.training.cpu_memory import keep_freed_memory

        keep_freed_memory()
    config = smolvla_config(IMAGE)
    policy = build_policy(config, torch.float32)
    policy.set_attn_implementation("sdpa")
    model = apply_adapter(policy, PeftOptions(r=RANK, lora_alpha=RANK))
    linears = use_cpu_linear(model, "auto")  # probes (or reads the cached choice) now, outside the timed steps
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=True)
    vlm = write_vlm(policy, vlm_parent)
    info = {**describe(model, optimizer, threads), "linears": linears, "vlm": str(vlm), "compiled": compile_model}
    def attention(precision: str) -> None:  # as training's --policy.attn-implementation auto on CPU
        policy.set_attn_implementation("eager" if precision == "bf16" else "sdpa", "sdpa")

    return Side(torch.compile(model) if compile_model else model, optimizer, config, info, attention)


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


def serve(side: str, threads: int, where: str, compile_model: bool = False) -> None:
    """Build the model, report it in one JSON line, then answer one JSON line per request until stdin closes."""
    import ctypes

    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr: stdout carries the protocol only
    built = build_ours(threads, Path(where), compile_model) if side != "lerobot" else build_lerobot(threads, where)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the build's freed memory (LeRobot drops 16 of 32 layers) leaves RSS
    protocol.write(json.dumps(built.info) + "\n")
    for line in sys.stdin:
        protocol.write(json.dumps(built.step(**json.loads(line))) + "\n")


# ---- the parent ----

class Worker:
    """A side's process: started with its python, spoken to in JSON lines; its stderr goes to a log file."""

    def __init__(self, side: str, python: str, threads: int, where: str, log: Path, compile_model: bool = False,
                 extra_env: dict[str, str] | None = None):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               **(extra_env or {})}
        if side == "lerobot":
            env["PYTHONPATH"] = ""  # LeRobot's venv; the torchvision stand-in is inside its site-packages
        self.side, self.log = side, log
        command = [python, __file__, "--worker", side, "--threads", str(threads), "--where", where]
        self.proc = subprocess.Popen(command + (["--compile"] if compile_model else []),
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
    samples: dict[str, list[dict]] = {side: [] for side in workers}
    first: dict[str, float] = {}
    for step in range(warmup + steps):
        for side, worker in workers.items():
            result = worker.request(batch=batch, precision=precision)
            first.setdefault(side, result["seconds"])
            if step >= warmup:
                samples[side].append(result)
    row: dict[str, Any] = {"batch": batch, "precision": precision}
    if "compiled" in workers:  # its first step of a row compiles (a new batch size or precision recompiles)
        row["compile_s"] = first["compiled"]
    for side in workers:
        row[f"{side}_s"] = statistics.median(s["seconds"] for s in samples[side])
        row[f"{side}_peak_bytes"] = max(s["peak_bytes"] for s in samples[side])
        row[f"{side}_loss"] = samples[side][-1]["loss"]
    row["ratio"] = row["ours_s"] / row["lerobot_s"]
    if "compiled" in workers:
        row["compiled_ratio"] = row["compiled_s"] / row["lerobot_s"]
    checksums = {samples[side][-1]["batch_checksum"] for side in workers}
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
    if any("compiled_s" in r for r in rows):
        lines += ["", "Ours under torch.compile (inductor), alternated with the two above:", "",
                  "| batch | precision | compiled s | compiled/LeRobot | compiled/ours | first step (compiles) s | "
                  "peak RSS GiB |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['batch']} | {r['precision']} | {r['compiled_s']:.2f} | {r['compiled_ratio']:.2f} | "
                         f"{r['compiled_s'] / r['ours_s']:.2f} | {r['compile_s']:.0f} | "
                         f"{r['compiled_peak_bytes'] / 2**30:.2f} |")
    return "\n".join(lines)


def profile_table(profiles: list[dict]) -> str:
    """Per (batch, precision): each side's step by phase and by operator group, seconds (profiled step's self CPU
    time; the profiler's own overhead inflates the total a little)."""
    lines = []
    for prof in profiles:
        sides = list(prof["sides"])
        lines += ["", f"Where the time goes, batch {prof['batch']} {prof['precision']} (seconds):", "",
                  "| part | " + " | ".join(sides) + " |", "|---|" + "---:|" * len(sides)]
        for phase in ("forward", "backward", "optimizer"):
            lines.append(f"| {phase} (wall) | " + " | ".join(f"{prof['sides'][x]['phases'][phase]:.2f}"
                                                               for x in sides) + " |")
        groups = [g for g, _ in OP_GROUPS] + ["other"]
        for group in groups:
            lines.append(f"| {group} | " + " | ".join(f"{prof['sides'][x]['groups'].get(group, 0.0):.2f}"
                                                      for x in sides) + " |")
        for side in sides:
            top = ", ".join(f"{name} {sec:.2f}" for name, sec in prof["sides"][side]["top_ops"][:8])
            lines.append(f"\n{side}'s top operators (self s): {top}")
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
    parser.add_argument("--compile", action="store_true",
                        help="also time our step under torch.compile (a third process, alternated with the others)")
    parser.add_argument("--system-malloc", action="store_true",
                        help="also time ours with glibc malloc's defaults (training keeps freed memory for reuse)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed rows, one profiled step per side and row: time by phase and operator")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--where", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        serve(args.worker, args.threads, args.where, args.compile)
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
            if args.system_malloc:  # A/B of finetune/training/cpu_memory.py: ours with glibc's defaults
                workers["system_malloc"] = Worker("ours", sys.executable, args.threads, str(Path(tmp, "sysmalloc")),
                                                  Path(tmp, "sysmalloc.log"),
                                                  extra_env={"BENCH_KEEP_FREED_MEMORY": "0"})
            if args.compile:
                workers["compiled"] = Worker("ours", sys.executable, args.threads, str(Path(tmp, "compiled")),
                                             Path(tmp, "compiled.log"), compile_model=True)
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
            profiles = []
            for batch in args.batch_sizes if args.profile else []:
                for precision in args.precisions:
                    profiles.append({"batch": batch, "precision": precision, "sides": {
                        side: workers[side].request(batch=batch, precision=precision, profile=True)
                        for side in ("ours", "lerobot")}})
        finally:
            for worker in workers.values():
                worker.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": cpu, "info": info, "rows": rows, "profiles": profiles}, indent=1) + "\n")
    print(table(cpu, info, rows))
    if profiles:
        print(profile_table(profiles))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
