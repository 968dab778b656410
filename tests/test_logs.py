"""Rank-aware logging: one rank prints, --log-level chooses how much, each run keeps its log in train.log."""

from __future__ import annotations

import logging
import shutil

from helpers import train_args

from finetune import train
from finetune.logs import LOG_FILE, setup_logging


def test_the_main_rank_shows_info_on_stdout_and_warnings_on_stderr(capsys):
    setup_logging("info", process_rank=0)
    logging.getLogger("finetune.x").info("hello")
    logging.getLogger("finetune.x").warning("careful")
    logging.getLogger("finetune.x").debug("detail")
    out, err = capsys.readouterr()
    assert (out, err) == ("hello\n", "careful\n")


def test_other_ranks_show_only_warnings_named_by_rank(capsys):
    setup_logging("debug", process_rank=3)
    logging.getLogger("finetune.x").info("hello")
    logging.getLogger("finetune.x").error("broken")
    out, err = capsys.readouterr()
    assert (out, err) == ("", "[rank 3] broken\n")
    setup_logging("info", process_rank=0)


def test_a_second_setup_replaces_the_first(capsys):
    setup_logging("info", process_rank=0)
    setup_logging("warning", process_rank=0)
    logging.getLogger("finetune.x").info("hidden")
    logging.getLogger("finetune.x").warning("shown once")
    out, err = capsys.readouterr()
    assert (out, err) == ("", "shown once\n")
    setup_logging("info", process_rank=0)


def test_a_run_keeps_its_messages_in_train_log_and_log_level_warning_is_quiet(policy_dir, dataset_root, tmp_path,
                                                                              capsys):
    train.main(train_args(policy_dir, dataset_root, tmp_path / "a", "--steps", "2"))
    out, err = capsys.readouterr()
    assert "parameters: trainable" in out and "train step 2/2" in err
    log = (tmp_path / "a" / LOG_FILE).read_text()
    assert " INFO parameters: trainable " in log and " INFO step 2: held-out action MSE " in log
    assert "checkpoint: " in log  # the end-of-run report

    train.main(train_args(policy_dir, dataset_root, tmp_path / "b", "--steps", "2", "--log-level", "warning"))
    out, err = capsys.readouterr()
    assert "parameters" not in out and "held-out" not in out and "train step" not in err
    assert not (tmp_path / "b" / LOG_FILE).exists()  # nothing to say: no file
    setup_logging("info", process_rank=0)


def test_the_error_that_ends_a_run_is_in_its_log(policy_dir, dataset_root, tmp_path, capsys):
    out = tmp_path / "run"
    diverging = train_args(policy_dir, dataset_root, out, "--steps", "3", "--optim.lr", "1e30",
                           "--optim.warmup-steps", "0")
    try:
        train.main(diverging)
    except SystemExit as exit_:
        assert exit_.code == train.EXIT_NONFINITE
    log = (out / LOG_FILE).read_text()
    assert log.index(" INFO parameters: trainable") < log.index(" ERROR NonFiniteError: ")
    capsys.readouterr()


def test_a_run_refused_before_it_logs_leaves_no_folder(policy_dir, dataset_root, tmp_path, capsys):
    no_stats = shutil.copytree(dataset_root, tmp_path / "no_stats")  # found when setup reads the dataset
    (no_stats / "meta" / "stats.json").unlink()
    try:
        train.main(train_args(policy_dir, no_stats, tmp_path / "run", "--steps", "2"))
    except SystemExit as exit_:
        assert exit_.code == 2
    assert "stats" in capsys.readouterr().err and not (tmp_path / "run").exists()

