#!/usr/bin/env bash
# Make an installed lerobot 0.6.1 (Python >= 3.12 syntax) importable on Python 3.11, for tests/test_libero.py's
# comparison with LeRobot's own LiberoEnv: rewrites its PEP 695 generics and `type` aliases in their 3.11 form
# (same meaning at run time). Install it first without its pins:
#   VENV/bin/pip install --no-deps --ignore-requires-python lerobot==0.6.1 "draccus>=0.11.6,<0.12"
# Usage: tools/lerobot_py311.sh VENV/bin/python
set -euo pipefail
site=$("$1" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("lerobot").origin))')
sed -i 's/^class DataProcessorPipeline\[TInput, TOutput\](HubMixin):/class DataProcessorPipeline(HubMixin, Generic[TInput, TOutput]):/;
        s/^from typing import Any, TypedDict, TypeVar, cast$/from typing import Any, Generic, TypedDict, TypeVar, cast/' \
    "$site/processor/pipeline.py"
sed -i 's/^def deserialize_json_into_object\[T: JsonLike\](fpath: Path, obj: T) -> T:/T = TypeVar("T")\n\n\ndef deserialize_json_into_object(fpath: Path, obj: T) -> T:/;
        s/^from typing import Any$/from typing import Any, TypeVar/' "$site/utils/io_utils.py"
sed -i -E 's/^type ([A-Za-z_]+) = /\1 = /' "$site/motors/motors_bus.py" "$site/datasets/aggregate.py"
"$1" -c 'import lerobot.envs.utils, lerobot.processor.env_processor' && echo "lerobot imports on $("$1" -V)"
