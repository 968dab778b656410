"""PEFT fine-tuning of Vision-Language-Action policies (SmolVLA, pi0, pi0.5) on LeRobot datasets.

Entry points: `train.py` (fine-tune), `demo.py` (the built-in demo), `eval.py` (does it help?),
`inference/predict.py`, `export/merge.py`. One package per concern: `policies/`, `data/`, `envs/`, `training/`,
`inference/`, `export/`; README.md's "Layout" lists every module.
"""
