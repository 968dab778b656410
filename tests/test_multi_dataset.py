"""Episode selection and several datasets in one run (finetune.data.multi and its hooks in train.py)."""

from __future__ import annotations

import pytest
from helpers import train_args

from finetune import train
from finetune.config import cli
from finetune.data.multi import parse_episodes, split_selection


def test_episode_specs_parse_to_sorted_unique_indices():
    assert parse_episodes(["0-3", "7", "2,9-10"]) == [[0, 1, 2, 3, 7, 9, 10]]
    assert parse_episodes([]) == [None]
    assert parse_episodes(["1:4-5", "0:0"], num_datasets=2) == [[0], [4, 5]]
    assert parse_episodes(["1:2"], num_datasets=3) == [None, [2], None]
    assert split_selection(range(10), [0, 1, 2, 5, 8], 2) == ([0, 1, 2], [5, 8])
    assert split_selection(range(4), None, 1) == ([0, 1, 2], [3])


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize("spec, expected", [
    (["x"], "expected an episode index N or a range A-B"),
    (["5-2"], "ends before it starts"),
    (["0-3", "42"], "episode(s) [42] that"),
    (["0-1"], "leaves no training episode"),
    (["1:0-3"], "dataset 1 does not exist"),
])
def test_bad_episode_selections_are_one_line_errors(policy_dir, dataset_root, tmp_path, capsys, spec, expected):
    argv = train_args(policy_dir, dataset_root, tmp_path / "out", "--steps", "1", "--dataset.episodes", *spec)
    assert expected in _error(capsys, argv)


def test_training_uses_only_the_selected_episodes(policy_dir, dataset_root, tmp_path):
    from finetune.train import make_accelerator, setup

    cfg = cli(train_args(policy_dir, dataset_root, tmp_path / "out", "--steps", "1", "--dataset.episodes", "1-4",
                         "7", "--dataset.eval-episodes", "1"))
    run = setup(cfg, make_accelerator(cfg))
    train_set = run.train_loader.dataset
    seen = {int(train_set[i]["episode_index"]) for i in range(len(train_set))}
    assert seen == {1, 2, 3, 4} and len(train_set) == 4 * 16
    # held out: the last of the selection (episode 7), not the dataset's last episodes
    assert set(run.eval_batches[0].batch["episode_index"].tolist()) == {7}
    run.accelerator.free_memory()
    run.accelerator._custom_objects.clear()
