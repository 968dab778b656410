"""Meta-World transfer: does pretraining pay off when the policy must see, and what does LoRA keep of it?

    .venv/bin/python bench/metaworld_transfer.py --out runs/bench_transfer            # ~90 min on 2 cores, '.[sim]'
    .venv/bin/python bench/metaworld_transfer.py --out runs/bench_transfer_quick --quick   # a few minutes
    .venv/bin/python bench/metaworld_transfer.py --out runs/bench_transfer_rerun --first-seed 2 \
        --compare runs/bench_transfer     # a rerun on new seeds: against the first run's intervals, then pooled

Setting (fixed here, before any training): the policy sees LeRobot's 4-value agent state (hand xyz, gripper) and
the `corner2` camera at 64 px, so object and goal positions come from the image only. A tiny SmolVLA (the project's
SmolVLA code at the demo's 2.8 M parameters) is pretrained in full on scripted-expert demos of ML10's 10 train tasks,
then adapted to ML10's 5 test tasks, which pretraining never saw: drawer-open, door-close, shelf-place, sweep-into,
lever-pull. Rows, on the same held-out demos, each trained with `--seeds` seeds from `--first-seed` (seed s adapts the
base pretrained with seed s; random initializations are seeded with s too):

- base: the pretrained policy zero-shot (the LoRA run's step 0: base weights, the held-out demos' stats);
- scratch: the same architecture from random weights, every weight trained;
- lora_r4 / lora_r16 / lora_r64: LoRA on the project's SmolVLA targets of the pretrained base;
- lora_random: LoRA r 16 on the randomly initialized base (what the adapter alone can do);
- full: every weight of the pretrained base fine-tuned.

Every row trains the same number of steps at the same batch size. The demos-per-task curve (`--demo-counts`, 5 10
25) runs scratch, lora_r16 and full at each count; the other rows run at `--headline-demos` (10). The smaller demo
sets are the first episodes of the larger ones (same seeds), each recorded as its own dataset so normalization
statistics come from the training demos only.

Closed loop: `--eval-episodes` seeded episodes per held-out task (seeds 10000 + 1000 * first seed ..., none used for
a demo, so a rerun with another `--first-seed` also draws new episodes), at most 150
steps, 5 actions executed per 10-action chunk, success from Meta-World's `info["success"]`. The 95% confidence
interval of a row's mean success is a two-level bootstrap: training seeds resampled, then episodes within each
(seed, task) cell, so it covers both seed-to-seed and episode-to-episode variation.

Jobs (record, pretrain, adapt+evaluate) run as subprocesses, `--workers` at a time with one thread each; each writes
`<out>/jobs/<job>.json` and its log to `<out>/logs/`, and a rerun skips the jobs already done. Per row: trainable
parameters, the size of what the run saves (adapter or full weights), training and evaluation wall time and the
job's peak RSS. Results: `<out>/results.json`, `<out>/results.md`, `<out>/transfer.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRETRAIN_SET, HELDOUT_SET = "ML10_train", "ML10_test"
STATE = "agent"
CAMERAS = ("corner2",)
IMAGE_SIZE = 64
EVAL_SEED = 10_000  # evaluation episodes use seeds no demo was recorded with
PRETRAIN_SEED, HELDOUT_SEED = 0, 1000  # demo seeds
EVAL_MAX_STEPS = 150  # the scripted experts need 53-96 steps on these tasks
N_ACTION_STEPS = 5
NUM_ENVS = 25


@dataclasses.dataclass
class Budget:
    pretrain_demos: int = 25
    demo_counts: tuple[int, ...] = (5, 10, 25)
    headline_demos: int = 10
    seeds: int = 2
    first_seed: int = 0  # training seeds first_seed, first_seed + 1, ...; also shifts the evaluation episodes
    pretrain_steps: int = 3000
    adapt_steps: int = 800
    batch_size: int = 32
    eval_episodes: int = 50
    pretrain_eval_episodes: int = 10
    workers: int = 2

    @property
    def seed_ids(self) -> range:
        return range(self.first_seed, self.first_seed + self.seeds)

    @property
    def eval_seed(self) -> int:
        return EVAL_SEED + 1000 * self.first_seed


QUICK = Budget(pretrain_demos=2, demo_counts=(2, 3), headline_demos=2, seeds=2, pretrain_steps=20, adapt_steps=10,
               batch_size=8, eval_episodes=3, pretrain_eval_episodes=1)


@dataclasses.dataclass(frozen=True)
class Row:
    init: str  # "pretrained" or "random"
    method: str  # "LORA" or "FULL"
    lr: float
    r: int = 0

    def peft(self) -> dict:
        return {"r": self.r, "lora_alpha": 2 * self.r} if self.method == "LORA" else {}


ROWS = {
    "scratch": Row("random", "FULL", 1e-3),
    "lora_random": Row("random", "LORA", 3e-3, r=16),
    "lora_r4": Row("pretrained", "LORA", 3e-3, r=4),
    "lora_r16": Row("pretrained", "LORA", 3e-3, r=16),
    "lora_r64": Row("pretrained", "LORA", 3e-3, r=64),
    "full": Row("pretrained", "FULL", 3e-4),
}
CURVE_ROWS = ("scratch", "lora_r16", "full")
TABLE_ROWS = ("base", "scratch", "lora_random", "lora_r4", "lora_r16", "lora_r64", "full")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tasks(name: str) -> tuple[str, ...]:
    from finetune.envs.metaworld import TASK_SETS

    return TASK_SETS[name]


# ---- the plan: jobs with dependencies ---------------------------------------------------------------------------


def plan(b: Budget) -> dict[str, dict]:
    """Job name -> {"kind", "deps", ...}; the names double as folder names under <out>."""
    jobs: dict[str, dict] = {"record_pretrain": {"kind": "record", "deps": [], "set": PRETRAIN_SET,
                                                 "episodes": b.pretrain_demos, "seed": PRETRAIN_SEED}}
    for n in sorted(set(b.demo_counts) | {b.headline_demos}):
        jobs[f"record_heldout_{n}"] = {"kind": "record", "deps": [], "set": HELDOUT_SET, "episodes": n,
                                       "seed": HELDOUT_SEED}
    for s in b.seed_ids:
        jobs[f"pretrain_s{s}"] = {"kind": "pretrain", "deps": ["record_pretrain"], "seed": s}
    for s in b.seed_ids:
        for n in sorted(set(b.demo_counts) | {b.headline_demos}):
            names = ROWS if n == b.headline_demos else CURVE_ROWS
            for row in names:
                deps = [f"record_heldout_{n}", "record_pretrain"] + ([f"pretrain_s{s}"]
                                                                    if ROWS[row].init == "pretrained" else [])
                jobs[f"{row}_d{n}_s{s}"] = {"kind": "adapt", "deps": deps, "row": row, "demos": n, "seed": s}
        jobs[f"base_d{b.headline_demos}_s{s}"] = {"kind": "base", "deps": [f"lora_r16_d{b.headline_demos}_s{s}"],
                                                 "demos": b.headline_demos, "seed": s}
    return jobs


# ---- jobs (each runs in its own process) ------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record_job(out: Path, job: dict) -> dict:
    from finetune.envs.record import RecordConfig, record

    root = out / "data" / job["name"]
    shutil.rmtree(root, ignore_errors=True)  # a half-written dataset from a killed run
    summary = record(RecordConfig(root=str(root), tasks=job["set"], episodes=job["episodes"], seed=job["seed"],
                                  image_size=IMAGE_SIZE, cameras=CAMERAS, state=STATE, max_steps=EVAL_MAX_STEPS))
    return {"episodes": summary["episodes"], "dropped": summary["dropped"], "frames": summary["frames"],
            "tasks": summary["tasks"]}


def initial_policy(out: Path, seed: int) -> Path:
    """The demo's tiny SmolVLA shape, sized to the Meta-World features, random weights from `seed`; tokenizer
    trained on all 50 instructions (a vocabulary, not a skill)."""
    import torch

    from finetune.data import load_dataset_meta
    from finetune.demo import TINY_VLM, tiny_smolvla_config, train_tokenizer
    from finetune.envs.metaworld import INSTRUCTIONS
    from finetune.policies import make_policy, save_policy

    folder = out / f"initial_policy_s{seed}"
    if (folder / "model.safetensors").is_file():
        return folder
    meta = load_dataset_meta(out / "data" / "record_pretrain")
    torch.manual_seed(seed)
    policy = make_policy(tiny_smolvla_config(meta), TINY_VLM)
    with torch.no_grad():
        policy.model.vlm_with_expert.vlm.model.vision_model.embeddings.position_embedding.weight.normal_(0.0, 1.0)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(policy, tmp)
    train_tokenizer(tmp, corpus=list(INSTRUCTIONS.values()))
    tmp.rename(folder)
    return folder


def train(out: Path, name: str, policy: Path, dataset: Path, method: str, steps: int, lr: float, b: Budget,
          seed: int, **peft) -> tuple[Path, dict]:
    from finetune import train as trainer
    from finetune.config import CheckpointOptions, DataOptions, OptimOptions, PeftOptions, PolicyOptions, TrainConfig

    cfg = TrainConfig(
        policy=PolicyOptions(path=str(policy)),
        peft=PeftOptions(method=method, **peft),
        dataset=DataOptions(root=(str(dataset),), eval_episodes=0, num_workers=0),
        optim=OptimOptions(lr=lr, decay_lr=lr / 10, warmup_steps=min(50, steps // 10), weight_decay=0.0,
                           grad_clip_norm=10.0),
        checkpoint=CheckpointOptions(every=steps, keep_last=1),
        output_dir=str(out / "runs" / name), steps=steps, batch_size=b.batch_size, seed=seed,
        log_every=max(1, steps // 10), eval_every=steps, cpu_threads=1,
        resume=(out / "runs" / name / "checkpoints" / "last").is_dir(),  # a killed job continues its run
    )
    summary = trainer.run_training(cfg, trainer.make_accelerator(cfg))
    return Path(summary["checkpoint"]), summary


def evaluate(predictor, task_names, episodes: int, seed: int) -> dict:
    from finetune.envs.rollout import run_closed_loop
    from finetune.eval import predictor_policy

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Constant.*may be too high")
        result = run_closed_loop(predictor_policy(predictor, seed=0), "metaworld", task_names, episodes,
                                 seed=seed, n_action_steps=N_ACTION_STEPS, image_size=IMAGE_SIZE,
                                 max_steps=EVAL_MAX_STEPS, batched=True, num_envs=NUM_ENVS,
                                 env_kwargs={"state": STATE, "cameras": CAMERAS})
    return {t: {"successes": r["successes"], "mean_steps": r["mean_steps"]} for t, r in result["per_task"].items()}


def saved_bytes(checkpoint: Path) -> int:
    """What the run saves as its result: the adapter, or the full weights."""
    files = list(checkpoint.glob("adapter_model.safetensors")) or list(checkpoint.glob("model.safetensors"))
    return sum(f.stat().st_size for f in files)


def pretrain_job(out: Path, job: dict, b: Budget) -> dict:
    from finetune.demo import export_base
    from finetune.inference.predict import Predictor

    s = job["seed"]
    init = initial_policy(out, s)
    tick = time.perf_counter()
    ckpt, summary = train(out, job["name"], init, out / "data" / "record_pretrain", "FULL", b.pretrain_steps, 1e-3,
                          b, seed=s)
    train_s = time.perf_counter() - tick
    base = out / f"base_s{s}"
    export_base(ckpt, init, base)
    tick = time.perf_counter()
    own = evaluate(Predictor.from_checkpoint(base, device="cpu"), tasks(PRETRAIN_SET), b.pretrain_eval_episodes,
                   b.eval_seed) \
        if b.pretrain_eval_episodes else {}
    return {"train_seconds": round(train_s, 1), "eval_seconds": round(time.perf_counter() - tick, 1),
            "trainable_params": summary["trainable_params"], "pretrain_tasks": own}


def adapt_job(out: Path, job: dict, b: Budget) -> dict:
    from finetune.inference.predict import Predictor

    row, s, n = ROWS[job["row"]], job["seed"], job["demos"]
    start = out / f"base_s{s}" if row.init == "pretrained" else initial_policy(out, s)
    tick = time.perf_counter()
    ckpt, summary = train(out, job["name"], start, out / "data" / f"record_heldout_{n}", row.method, b.adapt_steps,
                          row.lr, b, seed=s, **row.peft())
    train_s = time.perf_counter() - tick
    tick = time.perf_counter()
    if row.method == "FULL":
        predictor = Predictor.from_checkpoint(ckpt, device="cpu", tokenizer_path=str(start))
    else:
        predictor = Predictor.from_checkpoint(ckpt, str(start), device="cpu")
    result = evaluate(predictor, tasks(HELDOUT_SET), b.eval_episodes, b.eval_seed)
    return {"train_seconds": round(train_s, 1), "eval_seconds": round(time.perf_counter() - tick, 1),
            "trainable_params": summary["trainable_params"], "total_params": summary["total_params"],
            "saved_bytes": saved_bytes(ckpt), "heldout": result}


def base_job(out: Path, job: dict, b: Budget) -> dict:
    from finetune.inference.predict import Predictor

    s = job["seed"]
    lora = out / "runs" / f"lora_r16_d{job['demos']}_s{s}" / "checkpoints" / "last"
    tick = time.perf_counter()
    predictor = Predictor.from_checkpoint(lora, str(out / f"base_s{s}"), device="cpu", use_trained_weights=False)
    result = evaluate(predictor, tasks(HELDOUT_SET), b.eval_episodes, b.eval_seed)
    return {"train_seconds": 0.0, "eval_seconds": round(time.perf_counter() - tick, 1), "trainable_params": 0,
            "saved_bytes": 0, "heldout": result}


def run_job(out: Path, name: str) -> None:
    import torch

    torch.set_num_threads(1)
    saved = json.loads((out / "plan.json").read_text())
    b = Budget(**{**saved["budget"], "demo_counts": tuple(saved["budget"]["demo_counts"])})
    job = {**saved["jobs"][name], "name": name}
    kind = {"record": record_job, "pretrain": pretrain_job, "adapt": adapt_job, "base": base_job}[job["kind"]]
    tick = time.perf_counter()
    result = kind(out, job) if job["kind"] == "record" else kind(out, job, b)
    result.update(job=job, seconds=round(time.perf_counter() - tick, 1), peak_rss_mb=round(peak_rss_mb()))
    dest = out / "jobs" / f"{name}.json"
    dest.parent.mkdir(exist_ok=True)
    dest.with_suffix(".tmp").write_text(json.dumps(result, indent=1) + "\n")
    dest.with_suffix(".tmp").rename(dest)


# ---- the scheduler ----------------------------------------------------------------------------------------------


def run_all(out: Path, jobs: dict[str, dict], workers: int) -> int:
    """Start each job once its dependencies are done, `workers` at a time; stop at the first failure. Returns the
    number of jobs run."""
    done = {n for n in jobs if (out / "jobs" / f"{n}.json").is_file()}
    already = set(done)
    pending = [n for n in jobs if n not in done]
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    (out / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL",
                                                                                                      "egl")}
    log(f"{len(jobs)} jobs, {len(done)} already done, {workers} at a time")
    while pending or running:
        for name in [n for n in pending if all(d in done for d in jobs[n]["deps"])][:workers - len(running)]:
            pending.remove(name)
            with open(out / "logs" / f"{name}.log", "w") as logfile:
                proc = subprocess.Popen([sys.executable, __file__, "--out", str(out), "--job", name], env=env,
                                        stdout=logfile, stderr=subprocess.STDOUT)
            running[name] = (proc, time.perf_counter())
            log(f"start {name}")
        time.sleep(0.5)
        for name, (proc, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0:
                for other, _ in running.values():
                    other.terminate()
                raise SystemExit(f"job {name} failed (exit {proc.returncode}); see {out / 'logs' / (name + '.log')}")
            done.add(name)
            log(f"done  {name} in {time.perf_counter() - started:.0f} s ({len(done)}/{len(jobs)})")
    return len(jobs) - len(already)


# ---- the report -------------------------------------------------------------------------------------------------


def bootstrap_ci(cells: dict[int, dict[str, list[bool]]], reps: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean success over tasks: training seeds resampled, then episodes within each cell."""
    rng = np.random.default_rng(seed)
    seeds = sorted(cells)
    arrays = {s: [np.asarray(v, float) for v in cells[s].values()] for s in seeds}
    means = np.empty(reps)
    for i in range(reps):
        picked = rng.choice(seeds, size=len(seeds))
        means[i] = np.mean([np.mean([rng.choice(a, size=a.size).mean() for a in arrays[s]]) for s in picked])
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def row_stats(results: dict[str, dict], row: str, n: int, seeds: range) -> dict | None:
    names = [f"{row}_d{n}_s{s}" for s in seeds]
    if not all(name in results for name in names):
        return None
    cells = {s: {t: r["successes"] for t, r in results[name]["heldout"].items()} for s, name in enumerate(names)}
    task_names = list(cells[0])
    per_seed = [float(np.mean([np.mean(v) for v in cells[s].values()])) for s in cells]
    per_task = {t: float(np.mean([np.mean(cells[s][t]) for s in cells])) for t in task_names}
    lo, hi = bootstrap_ci(cells)
    first = results[names[0]]
    return {"mean": float(np.mean(per_seed)), "ci95": [lo, hi], "per_seed": per_seed, "per_task": per_task,
            "trainable_params": first["trainable_params"], "saved_bytes": first["saved_bytes"],
            "train_seconds": float(np.mean([results[x]["train_seconds"] for x in names])),
            "eval_seconds": float(np.mean([results[x]["eval_seconds"] for x in names])),
            "peak_rss_mb": max(results[x]["peak_rss_mb"] for x in names)}


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def report(out: Path, b: Budget, jobs: dict[str, dict], seconds: float) -> str:
    results = {n: json.loads((out / "jobs" / f"{n}.json").read_text()) for n in jobs
               if (out / "jobs" / f"{n}.json").is_file()}
    held = tasks(HELDOUT_SET)
    head = {row: row_stats(results, row, b.headline_demos, b.seed_ids) for row in TABLE_ROWS}
    curve = {row: {n: row_stats(results, row, n, b.seed_ids) for n in b.demo_counts} for row in CURVE_ROWS}
    short = {t: t.removesuffix("-v3") for t in held}
    md = [f"Held-out ML10 test tasks, {b.headline_demos} demos per task, {b.eval_episodes} episodes per task and "
          f"seed, training seeds {b.seed_ids.start}-{b.seed_ids.stop - 1} (success; 95% CI of the mean):", "",
          "| row | " + " | ".join(short.values()) + " | mean [95% CI] | per seed | trainable | saved | train | "
          "eval | peak RSS |", "|---|" + "---:|" * (len(held) + 7)]
    for row, st in head.items():
        if st is None:
            continue
        md.append(f"| {row} | " + " | ".join(pct(st["per_task"][t]) for t in held)
                  + f" | **{pct(st['mean'])}** [{pct(st['ci95'][0])}, {pct(st['ci95'][1])}]"
                  + f" | {' / '.join(pct(x) for x in st['per_seed'])} | {st['trainable_params'] / 1e3:,.0f} k"
                  + f" | {st['saved_bytes'] / 2**20:.2f} MiB | {st['train_seconds']:.0f} s | {st['eval_seconds']:.0f} s"
                  + f" | {st['peak_rss_mb'] / 1024:.2f} GB |")
    md += ["", "Demos per task (mean success over the 5 held-out tasks [95% CI]):", "",
           "| row | " + " | ".join(f"{n} demos" for n in b.demo_counts) + " |", "|---|" + "---:|" * len(b.demo_counts)]
    for row, by_n in curve.items():
        md.append(f"| {row} | " + " | ".join(f"{pct(st['mean'])} [{pct(st['ci95'][0])}, {pct(st['ci95'][1])}]"
                                               if st else "" for st in by_n.values()) + " |")
    own = [results[f"pretrain_s{s}"]["pretrain_tasks"] for s in b.seed_ids if f"pretrain_s{s}" in results]
    if own and own[0]:
        rates = {t: np.mean([np.mean(o[t]["successes"]) for o in own]) for t in own[0]}
        md += ["", f"The base on its own pretraining tasks ({b.pretrain_eval_episodes} episodes per task and seed): "
               + ", ".join(f"{t.removesuffix('-v3')} {pct(r)}" for t, r in rates.items())
               + f" (mean {pct(float(np.mean(list(rates.values()))))})."]
    pre = [results[f"pretrain_s{s}"]["train_seconds"] for s in b.seed_ids if f"pretrain_s{s}" in results]
    md += ["", f"Pretraining {b.pretrain_steps} steps: {np.mean(pre):.0f} s per seed. Whole run {seconds / 60:.1f} min "
           f"wall with {b.workers} workers on {cpu_name()}."]
    (out / "results.json").write_text(json.dumps({"budget": dataclasses.asdict(b), "headline": head, "curve": {
        r: {str(n): v for n, v in c.items()} for r, c in curve.items()}, "jobs": results, "seconds": round(seconds),
        "machine": platform.platform(), "cpu": cpu_name()}, indent=1) + "\n")
    (out / "results.md").write_text("\n".join(md) + "\n")
    plot(out / "transfer.png", b, head, curve)
    return "\n".join(md)


def compare(out: Path, other: Path) -> str:
    """This run's rows beside another run's (same budget, other seeds): does each mean fall in the other's interval?"""
    mine, theirs = (json.loads((d / "results.json").read_text()) for d in (out, other))
    pairs = [(f"{row}, {mine['budget']['headline_demos']} demos", mine["headline"][row], theirs["headline"].get(row))
             for row in TABLE_ROWS if mine["headline"].get(row)]
    pairs += [(f"{row}, {n} demos", st, theirs["curve"].get(row, {}).get(n)) for row, by_n in mine["curve"].items()
              for n, st in by_n.items() if st and n != str(mine["budget"]["headline_demos"])]

    def cell(st: dict) -> str:
        return f"{pct(st['mean'])} [{pct(st['ci95'][0])}, {pct(st['ci95'][1])}]"

    def inside(x: dict, y: dict) -> bool:
        return y["ci95"][0] <= x["mean"] <= y["ci95"][1]

    mine_seed, their_seed = mine["budget"].get("first_seed", 0), theirs["budget"].get("first_seed", 0)
    md = [f"This run ({out}, seeds from {mine_seed}) against {other} (seeds from {their_seed}):", "",
          "| row | other run | this run | this mean in the other's CI | other mean in this CI |",
          "|---|---|---|---|---|"]
    agree = 0
    for name, st, ref in pairs:
        if ref is None:
            md.append(f"| {name} | (not run) | {cell(st)} | | |")
            continue
        both = inside(st, ref) and inside(ref, st)
        agree += both
        verdicts = ["yes" if inside(x, y) else "**no**" for x, y in ((st, ref), (ref, st))]
        md.append(f"| {name} | {cell(ref)} | {cell(st)} | {verdicts[0]} | {verdicts[1]} |")
    compared = sum(ref is not None for _, _, ref in pairs)
    md += ["", f"{agree} of {compared} rows: each mean inside the other run's interval."]
    return "\n".join(md)


def pooled(out: Path, other: Path) -> str:
    """Both runs' training seeds together (their seeds must differ): each row's mean and interval over all of them."""
    results, seeds = {}, set()
    for run in (out, other):
        budget = json.loads((run / "results.json").read_text())["budget"]
        first = budget.get("first_seed", 0)
        seeds |= set(range(first, first + budget["seeds"]))
        results |= {f.stem: json.loads(f.read_text()) for f in (run / "jobs").glob("*.json")}
    ids = range(min(seeds), max(seeds) + 1)
    if len(seeds) != len(ids):
        raise SystemExit(f"--compare: the two runs' seeds {sorted(seeds)} overlap or leave a gap")
    b = Budget()
    md = [f"Both runs pooled ({out}, {other}): training seeds {ids.start}-{ids.stop - 1}:", "",
          "| row | " + " | ".join(f"{n} demos" for n in b.demo_counts) + " |", "|---|" + "---:|" * len(b.demo_counts)]
    for row in TABLE_ROWS:
        cells = []
        for n in b.demo_counts:
            st = row_stats(results, row, n, ids)
            cells.append(f"{pct(st['mean'])} [{pct(st['ci95'][0])}, {pct(st['ci95'][1])}]" if st else "")
        md.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(md)


def plot(path: Path, b: Budget, head: dict, curve: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1.1, 1]})
    for row, by_n in curve.items():
        points = [(n, st) for n, st in by_n.items() if st]
        if not points:
            continue
        xs = [n for n, _ in points]
        ys = [100 * st["mean"] for _, st in points]
        err = [[100 * (st["mean"] - st["ci95"][0]) for _, st in points],
               [100 * (st["ci95"][1] - st["mean"]) for _, st in points]]
        left.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=row)
    if head.get("base"):
        left.axhline(100 * head["base"]["mean"], color="gray", linestyle=":", label="base, zero-shot")
    left.set(xlabel="demos per held-out task", ylabel="success on ML10 test tasks (%)", xscale="log", ylim=(0, 100),
             title="Demos per task")
    left.set_xticks(list(b.demo_counts), [str(n) for n in b.demo_counts])
    left.minorticks_off()
    left.legend()
    rows = [r for r in TABLE_ROWS if head.get(r)]
    means = [100 * head[r]["mean"] for r in rows]
    err = [[100 * (head[r]["mean"] - head[r]["ci95"][0]) for r in rows],
           [100 * (head[r]["ci95"][1] - head[r]["mean"]) for r in rows]]
    right.bar(rows, means, yerr=err, capsize=4, color="tab:blue")
    right.set(ylabel="success (%)", ylim=(0, 100), title=f"{b.headline_demos} demos per task")
    right.tick_params(axis="x", rotation=30)
    fig.suptitle("Meta-World ML10: tiny SmolVLA, agent state + 64 px camera, 95% CIs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench_transfer")
    parser.add_argument("--quick", action="store_true", help="a few minutes with tiny budgets (CI-sized check)")
    parser.add_argument("--compare", help="another run's --out (other seeds): is each row inside its interval?")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job of <out>/plan.json
    for f in dataclasses.fields(Budget):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=None,
                            nargs="+" if f.name == "demo_counts" else None)
    args = parser.parse_args()
    out = Path(args.out)
    if args.job:
        run_job(out, args.job)
        return
    over = {f.name: getattr(args, f.name) for f in dataclasses.fields(Budget) if getattr(args, f.name) is not None}
    if "demo_counts" in over:
        over["demo_counts"] = tuple(over["demo_counts"])
    b = dataclasses.replace(QUICK if args.quick else Budget(), **over)
    if b.headline_demos not in b.demo_counts:
        raise SystemExit(f"--headline-demos {b.headline_demos} must be one of --demo-counts {b.demo_counts}")
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(b)
    plan_file = out / "plan.json"
    same = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(b))).items() if k != "workers"}
    defaults = json.loads(json.dumps(dataclasses.asdict(Budget())))  # for fields a run of an older version lacks
    if plan_file.is_file() and {k: v for k, v in {**defaults, **json.loads(plan_file.read_text())["budget"]}.items()
                                if k != "workers"} != same:
        raise SystemExit(f"{out} holds a run with another budget ({plan_file}); use a new --out")
    plan_file.write_text(json.dumps({"budget": dataclasses.asdict(b), "jobs": jobs}, indent=1) + "\n")
    log(f"budget {b}")
    start = time.perf_counter()
    ran = run_all(out, jobs, b.workers)
    wall = out / "wall_seconds.json"  # summed over the invocations that ran jobs (a rerun only reports)
    seconds = json.loads(wall.read_text())["seconds"] if wall.is_file() else 0.0
    seconds += (time.perf_counter() - start) if ran else 0.0
    wall.write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
    print(report(out, b, jobs, seconds))
    if args.compare:
        text = compare(out, Path(args.compare)) + "\n\n" + pooled(out, Path(args.compare))
        (out / "compare.md").write_text(text + "\n")
        print("\n" + text)
    log(f"results: {out / 'results.md'}, {out / 'results.json'}, {out / 'transfer.png'}")


if __name__ == "__main__":
    main()
