"""Rewrite LeRobot's PEP 695 lines (Python 3.12 syntax) to Python 3.11 syntax, in place.

`class C[T, U](Base):` -> TypeVars defined above it and `class C(Base, Generic[T, U]):`;
`def f[T: Bound](...)` -> `T = TypeVar("T", bound=Bound)` above it and `def f(...)`; `type X = Y` -> `X = Y`.
Used by tools/lerobot_env.sh and for the LIBERO comparison; idempotent.
Usage: VENV/bin/python tools/lerobot_py311.py [SITE_PACKAGES/lerobot]   (default: the lerobot that VENV's python finds)
"""

import re
import sys
from pathlib import Path

CLASS = re.compile(r"^(\s*)class (\w+)\[([^\]]+)\](?:\(([^)]*)\))?:")
DEF = re.compile(r"^(\s*)def (\w+)\[([^\]]+)\]\(")
TYPE_ALIAS = re.compile(r"^(\s*)type (\w+) = ")


def _typevars(indent: str, params: str) -> tuple[list[str], list[str]]:
    names, lines = [], []
    for param in params.split(","):
        name, _, bound = (part.strip() for part in param.partition(":"))
        names.append(name)
        bound_arg = f", bound={bound}" if bound else ""
        lines.append(f'{indent}{name} = __import__("typing").TypeVar("{name}"{bound_arg})\n')
    return names, lines


def _insert_above_decorators(out: list[str], lines: list[str]) -> None:
    at = len(out)
    while at > 0 and out[at - 1].lstrip().startswith("@"):
        at -= 1
    out[at:at] = lines


def rewrite(source: str) -> str:
    out: list[str] = []
    for line in source.splitlines(keepends=True):
        if m := CLASS.match(line):
            indent, name, params, bases = m.groups()
            names, lines = _typevars(indent, params)
            generic = f'__import__("typing").Generic[{", ".join(names)}]'
            all_bases = f"{bases}, {generic}" if bases else generic
            _insert_above_decorators(out, lines)
            out.append(f"{indent}class {name}({all_bases}):{line[m.end():]}")
        elif m := DEF.match(line):
            indent, name, params = m.groups()
            _, lines = _typevars(indent, params)
            _insert_above_decorators(out, lines)
            out.append(f"{indent}def {name}({line[m.end():]}")
        elif m := TYPE_ALIAS.match(line):
            out.append(f"{m.group(1)}{m.group(2)} = {line[m.end():]}")
        else:
            out.append(line)
    return "".join(out)


def main(package: Path) -> None:
    changed = 0
    for path in sorted(package.rglob("*.py")):
        text = path.read_text()
        new = rewrite(text)
        if new != text:
            path.write_text(new)
            changed += 1
            print(f"lerobot_py311: rewrote {path.relative_to(package.parent)}")
    print(f"lerobot_py311: {changed} files rewritten")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:  # find_spec locates the package without importing it (its 3.12 syntax would not parse)
        import importlib.util

        spec = importlib.util.find_spec("lerobot")
        if spec is None or spec.origin is None:
            raise SystemExit("lerobot_py311: lerobot is not installed for this python")
        main(Path(spec.origin).parent)
