"""Silence third-party notices a user cannot act on. Imported first by the entry points (a side effect on import:
the filters must be in place before peft imports bitsandbytes).

- bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" at import on CPUs with AVX512-BF16
  when the optional `kernels` package is absent; its plain CPU kernels are used instead, which is what we want.
- DeepSpeed warns "Setting accelerator to CPU" on every machine without a GPU unless DS_ACCELERATOR says so.
"""

from __future__ import annotations

import logging
import os

_NOTICES = {"bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",)}


class _DropNotices(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


for _name, _prefixes in _NOTICES.items():
    logging.getLogger(_name).addFilter(_DropNotices(_prefixes))


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


if "DS_ACCELERATOR" not in os.environ and _no_gpu():
    os.environ["DS_ACCELERATOR"] = "cpu"
