"""The training loop's parts: builders for data, model and optimizer, checkpoints, distributed plumbing, preemption,
sampling, EMA, metrics, held-out evaluation, the run folder and resume policy, and the checks made before training.

Nothing here imports export, inference, evaluation-in-simulators or demo code (tests/test_layout.py checks it).
"""
