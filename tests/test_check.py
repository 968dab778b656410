"""finetune-check (finetune.data.check): each defect planted in a small real dataset is reported with its fix, a clean
dataset passes with exit status 0, and training stops at start on what the quick checks find."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import train_args
from legacy_writer import write_legacy_dataset

from finetune import train
from finetune.data import make_synthetic_dataset
from finetune.data.check import POLICY_STATS, Finding, check_dataset, check_timestamp_sync, main

CAM = "observation.images.top"
DATA = "data/chunk-000/file-000.parquet"  # episodes 0 and 1 of the v3 dataset
VIDEO = f"videos/{CAM}/chunk-000/file-000.mp4"
QS = ("q01", "q99")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, Path]:
    """A v3.0 dataset (5 episodes of 6 frames at 10 fps, 2 episodes per file) and its v2.1 rewrite."""
    v3 = make_synthetic_dataset(tmp_path_factory.mktemp("check") / "v3", num_episodes=5, target_colors=["red", "blue"],
                                episode_length=6, image_size=32, seed=1, episodes_per_file=2)
    return {"v3": v3, "v21": write_legacy_dataset(v3, v3.parent / "v21")}


def _rewrite(path: Path, change: Callable[[dict], None]) -> None:
    table = pq.read_table(path)
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    change(columns)
    pq.write_table(pa.table({k: pa.array(v, table.schema.field(k).type) if k in table.column_names else pa.array(v)
                             for k, v in columns.items()}), path)


def _retype(path: Path, column: str, kind: pa.DataType) -> None:
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, table.column(column).cast(kind)),
                   path)


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _shift_timestamp(c):
    c["timestamp"][9] += 0.1  # episode 1, frame 3


def _nan_state(c):
    c["observation.state"][2] = [float("nan"), 0.0]


def _drop_action(c):
    del c["action"]


def _bad_task(c):
    c["task_index"][0] = 7


def _stats(key, stat, value):
    def change(s):
        s[key][stat] = value
    return change


def _from_timestamp(episodes: slice | int, delta: float):
    def change(c):
        column = c[f"videos/{CAM}/from_timestamp"]
        for i in range(len(column))[episodes] if isinstance(episodes, slice) else [episodes]:
            column[i] += delta
    return change


# (what to break, expected finding: level, check, where (relative to the root), problem pattern, fix pattern)
V3_DEFECTS = {
    "timestamp jump": (lambda r: _rewrite(r / DATA, _shift_timestamp),
                       ("error", "timestamps", DATA, r"episode 1: timestamps step by 0\.2000 s between frames 2 and 3 "
                        r"\(1/fps = 0\.1000 s, tolerance 0\.0001 s; 2 such step\(s\)\)", r"re-record it, leave it out "
                        r"with --dataset\.episodes, or fix its timestamps")),
    "NaN in the state": (lambda r: _rewrite(r / DATA, _nan_state),
                         ("error", "features", DATA, r"'observation\.state' holds NaN/inf in 1 row\(s\) "
                          r"\(first: row 2, episode 0\)", r"repair or drop those rows")),
    "a missing column": (lambda r: _rewrite(r / DATA, _drop_action),
                         ("error", "features", DATA,
                          r"missing column\(s\) \['action'\] named in meta/info\.json features",
                          r"rewrite the file with them or remove the features")),
    "a shape unlike the feature's": (lambda r: _edit_json(r / "meta/info.json",
                                                          lambda i: i["features"]["action"].update(shape=[3])),
                                     ("error", "features", DATA, r"column 'action' holds vectors of shape \(2,\) "
                                      r"but meta/info\.json features\['action'\]\['shape'\] is \(3,\)",
                                      r"fix the feature")),
    "floats in an index column": (lambda r: _retype(r / DATA, "task_index", pa.float64()),
                                  ("error", "features", DATA, r"column 'task_index' holds double values, not integers",
                                   r"rewrite the column with the values it should hold")),
    "an unknown task_index": (lambda r: _rewrite(r / DATA, _bad_task),
                              ("error", "tasks", DATA, r"task_index 7 is not in the tasks table \(2 tasks\)",
                               r"add the task to the tasks table")),
    "a negative std": (lambda r: _edit_json(r / "meta/stats.json", _stats("action", "std", [0.5, -0.1])),
                       ("error", "stats", "meta/stats.json", r"'action' std is negative at \[1\]",
                        r"recompute them with `finetune-stats \S+`")),
    "NaN in the stats": (lambda r: _edit_json(r / "meta/stats.json", _stats("observation.state", "mean",
                                                                             [float("nan"), 0.0])),
                         ("error", "stats", "meta/stats.json", r"'observation\.state' 'mean' holds NaN/inf",
                          r"normalization would turn every batch into NaN")),
    "stats of the wrong shape": (lambda r: _edit_json(r / "meta/stats.json", _stats("action", "min", [0.0, 0, 0])),
                                 ("error", "stats", "meta/stats.json", r"'action' 'min' has shape \(3,\), the feature "
                                  r"\(2,\)", r"finetune-stats")),
    "a zero std": (lambda r: _edit_json(r / "meta/stats.json", _stats("action", "std", [0.0, 0.3])),
                   ("warning", "stats", "meta/stats.json", r"'action' std is 0 at dimension\(s\) \[0\] "
                    r"\(constant in the data\)",
                    r"harmless if that dimension is truly constant")),
    "no quantiles": (lambda r: _edit_json(r / "meta/stats.json", lambda s: [s["action"].pop(q) for q in QS]),
                     ("warning", "stats", "meta/stats.json", r"'action' lacks \['q01', 'q99'\], which pi05 normalizes "
                      "with", r"add them with `finetune-stats \S+ --missing-only`")),
    "a video shorter than its episodes": (
        lambda r: _rewrite(r / "meta/episodes/chunk-000/file-000.parquet", _from_timestamp(1, 0.5)),
        ("error", "timestamps", VIDEO, r"episode 1 needs '[\w.]+' frames up to t=1\.600 s but the video ends at "
         r"1\.100 s", r"re-encode the video or fix the episode's from_timestamp")),
    "frames off their timestamps": (
        lambda r: _rewrite(r / "meta/episodes/chunk-000/file-000.parquet", _from_timestamp(slice(0, 2), 0.02)),
        ("warning", "video", VIDEO, r"episode [01] frame \d \('[\w.]+'\): the frame for t=\S+ s is at \S+ s, off by "
         r"more than LeRobot's 0\.0001 s", r"re-encode the video from the source frames")),
    "a truncated video": (lambda r: (r / VIDEO).write_bytes((r / VIDEO).read_bytes()[:200]),
                          ("error", "video", VIDEO, r"cannot read video \(.+\)",
                           r"the file is truncated or not an mp4")),
    "an unsupported version": (lambda r: _edit_json(r / "meta/info.json", lambda i: i.update(codebase_version="v1.6")),
                               ("error", "version", "meta/info.json", r"codebase_version 'v1\.6' is not supported",
                                r"convert it with LeRobot's tools")),
}


def _matches(finding: Finding, root: Path, expected) -> bool:
    level, check, where, problem, fix = expected
    return (finding.level, finding.check, finding.where) == (level, check, str(root / where)) \
        and re.fullmatch(problem, finding.problem) is not None and re.search(fix, finding.fix) is not None


@pytest.mark.parametrize("defect", list(V3_DEFECTS))
def test_each_defect_is_reported_with_its_fix(clean, tmp_path, capsys, defect):
    root = shutil.copytree(clean["v3"], tmp_path / "ds")
    plant, expected = V3_DEFECTS[defect]
    plant(root)
    findings = check_dataset(root)
    assert [f for f in findings if _matches(f, root, expected)], findings
    status = main([str(root)])
    assert status == (1 if expected[0] == "error" else 0)
    out = capsys.readouterr().out
    assert f"{expected[0].upper()}  {expected[1]}" in out and "-> fix: " in out


def test_clean_datasets_pass_with_exit_status_0(clean, capsys):
    assert check_dataset(clean["v3"], policies=["pi05", "smolvla"]) == []
    assert main([str(clean["v3"]), "--policy", "pi05"]) == 0
    assert capsys.readouterr().out == f"{clean['v3']}: 0 error(s), 0 warning(s): ready to train\n"
    # v2.1 as LeRobot writes it: per-episode stats without quantiles, which only pi0.5 needs
    findings = check_dataset(clean["v21"])
    assert [(f.level, f.problem) for f in findings] == [
        ("warning", f"'{k}' lacks ['q01', 'q99'], which pi05 normalizes with") for k in ("observation.state", "action")]
    assert findings[0].fix.startswith("none needed to train: the v3.0 conversion (training's, or `finetune-convert")
    assert main([str(clean["v21"])]) == 0
    assert main([str(clean["v21"]), "--policy", "pi05"]) == 0  # warnings only
    assert check_dataset(clean["v21"], policies=["smolvla"]) == []


def test_v21_layout_defects(clean, tmp_path):
    root = shutil.copytree(clean["v21"], tmp_path / "v21")
    (root / f"videos/chunk-000/{CAM}/episode_000004.mp4").unlink()
    _rewrite(root / "data/chunk-000/episode_000002.parquet", lambda c: [v.pop() for v in c.values()])
    episodes = root / "meta/episodes.jsonl"
    kept = [line for line in episodes.read_text().splitlines() if '"episode_index": 3' not in line]
    episodes.write_text("".join(line + "\n" for line in kept))
    findings = {(f.level, f.check, Path(f.where).name, f.problem) for f in check_dataset(root)}
    assert ("error", "layout", "episode_000004.mp4", f"not found ('{CAM}' of episodes [4])") in findings
    assert ("error", "episodes", "episode_000002.parquet",
            "episode 2 has 5 rows but its metadata says length 6") in findings
    assert ("warning", "episodes", "meta", "episode indices are not 0..3: 1 missing (first [3])") in findings
    assert ("warning", "episodes", "episode_000004.parquet",
            "episode 4: 'index' is not 18..23 (found 24..29)") in findings
    assert ("warning", "layout", "info.json", "total_episodes is 5 but the metadata lists 4") in findings


def test_timestamp_sync_uses_lerobots_tolerance():
    fps = 30.0
    clean = (np.arange(100) / fps).astype(np.float32)  # float32 rounding stays far inside 1e-4 s
    assert check_timestamp_sync(clean, fps) is None
    late = clean.copy()
    late[50:] += 2e-4
    assert check_timestamp_sync(late, fps).startswith("timestamps step by 0.0335 s between frames 49 and 50")
    assert check_timestamp_sync(clean + 0.5, fps) == "its first timestamp is 0.5000 s, not 0"


def test_policy_stats_table_matches_the_policies():
    from finetune.data.stats import NEEDED_STATS
    from finetune.policies import PI0Config, PI05Config, SmolVLAConfig

    for name, config in (("smolvla", SmolVLAConfig), ("pi0", PI0Config), ("pi05", PI05Config)):
        mapping = config().normalization_mapping
        assert POLICY_STATS[name] == NEEDED_STATS[mapping["ACTION"]] == NEEDED_STATS[mapping["STATE"]], name


def test_training_stops_at_start_on_a_dataset_error(policy_dir, dataset_root, tmp_path, capsys):
    root = shutil.copytree(dataset_root, tmp_path / "ds")
    _rewrite(root / DATA, _shift_timestamp)
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(policy_dir, root, tmp_path / "out", "--steps", "1"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {root / DATA}: episode 0: timestamps step by 0.2000 s between frames 8 and 9 (1/fps = "
                   "0.1000 s, tolerance 0.0001 s; 2 such step(s)); the episode dropped or repeated frames: re-record "
                   "it, leave it out with --dataset.episodes, or fix its timestamps (frame_index / fps) if only they "
                   "are wrong")
    assert not (tmp_path / "out/checkpoints").exists()


def test_frames_that_do_not_decode_are_reported(clean, tmp_path):
    root = shutil.copytree(clean["v3"], tmp_path / "ds")
    video = bytearray((root / VIDEO).read_bytes())
    start = int(len(video) * 0.3)  # inside the frames' data, past the header
    video[start : start + 400] = np.random.default_rng(0).integers(0, 255, 400, dtype=np.uint8).tobytes()
    (root / VIDEO).write_bytes(bytes(video))
    findings = check_dataset(root, samples=12)  # every frame of the file's 2 episodes
    broken = [f for f in findings if f.where == str(root / VIDEO)]
    assert broken and all(f.level == "error" and f.check == "video" for f in broken)
    assert re.fullmatch(rf"episode [01] frame \d \('{CAM}'\): decoding the frame at t=\S+ s fails \(.+\)",
                        broken[0].problem)
    assert broken[0].fix == "the file is damaged: restore it from the dataset's source"
    assert len({f.problem for f in broken}) == len(broken)  # each frame once


def test_unreadable_metadata_is_one_finding_with_the_readers_fix(clean, tmp_path):
    root = shutil.copytree(clean["v21"], tmp_path / "v21")
    (root / "meta/tasks.jsonl").write_text('{"task": "no index"}\n')
    [finding] = check_dataset(root)
    assert (finding.level, finding.check, finding.where) == ("error", "layout", str(root / "meta"))
    assert finding.problem == (f"{root / 'meta/tasks.jsonl'}: a row lacks an integer 'task_index' or a 'task' "
                               "(KeyError('task_index'))")
    assert finding.fix == "restore the file from the dataset's source"


def test_the_command_exits_1_when_any_dataset_has_an_error(clean, tmp_path):
    import subprocess
    import sys

    broken = shutil.copytree(clean["v3"], tmp_path / "broken")
    _rewrite(broken / DATA, _bad_task)
    proc = subprocess.run([sys.executable, "-m", "finetune.data.check", str(clean["v3"]), str(broken), "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{clean['v3']}: 0 error(s), 0 warning(s): ready to train"
    assert lines[1].split() == ["LEVEL", "CHECK", "WHERE", "PROBLEM", "->", "FIX"]
    assert lines[2].startswith(f"ERROR  tasks  {DATA}  task_index 7 is not in the tasks table (2 tasks) -> fix: ")
    assert lines[3] == f"{broken}: 1 error(s), 0 warning(s): not ready to train"


def test_training_logs_the_quick_checks_warnings_and_goes_on(policy_dir, dataset_root, tmp_path, capsys):
    from helpers import set_up_run

    from finetune.logs import setup_logging

    setup_logging("info", process_rank=0)  # as finetune-train routes messages
    root = shutil.copytree(dataset_root, tmp_path / "ds")
    _edit_json(root / "meta/info.json", lambda info: info.update(total_frames=999))
    run = set_up_run(train_args(policy_dir, root, tmp_path / "out", "--steps", "1"))
    assert len(run.data.loader.dataset) == 8 * 16  # training episodes: all but the 2 held out
    assert (f"warning: {root / 'meta/info.json'}: total_frames is 999 but the metadata lists 160; set total_frames "
            "to 160") in capsys.readouterr().err
    run.accelerator.free_memory()


@pytest.mark.parametrize("version", ["v3", "v21"])
@pytest.mark.parametrize("change, field", [
    (lambda i: i.update(fps="30"), "'fps' must be a positive number (found '30')"),
    (lambda i: i["features"]["action"].update(shape=None), "features['action'] must be an object with a 'dtype' "
                                                           "string and a 'shape' list of positive integers"),
    (lambda i: i["features"].update({CAM: "video"}), f"features['{CAM}'] must be an object"),
])
def test_a_malformed_info_json_is_one_finding_not_a_crash(clean, tmp_path, version, change, field):
    root = shutil.copytree(clean[version], tmp_path / "ds")
    _edit_json(root / "meta/info.json", change)
    [finding] = check_dataset(root)
    assert finding.level == "error" and finding.problem.startswith(f"{root / 'meta/info.json'}: {field}")
    assert finding.fix == "restore the file from the dataset's source"
