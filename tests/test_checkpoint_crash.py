"""A crash at any moment of a save leaves `checkpoints/last` loadable: the save of a real run is cut short before
each of its filesystem operations in turn (tests/crash_during_save.py forks one crash per operation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("mode", ["new", "resave"])
def test_a_crash_before_any_filesystem_operation_of_a_save_leaves_last_loadable(mode, policy_dir, dataset_root,
                                                                                 tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "tests/crash_during_save.py"), str(policy_dir),
                           str(dataset_root), str(tmp_path / "run"), mode], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) > 20 and rows[-1]["finished"] and not any(r["finished"] for r in rows[:-1])  # every point
    broken = [r for r in rows if not r["loads"]]
    assert broken == []
    steps = [r["step"] for r in rows]
    if mode == "new":  # the previous checkpoint until `last` moves, the new one from then on
        assert steps[0] == 1 and steps[-1] == 2 and steps == sorted(steps)
    else:
        assert set(steps) == {2}
