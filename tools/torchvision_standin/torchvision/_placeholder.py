"""A stand-in for torchvision in .lerobot-venv (see tools/lerobot_env.sh): PyPI's torchvision needs a CUDA torch
on these machines, and LeRobot imports a few of its names at import time without using them to load a policy."""

from types import ModuleType


def placeholder(module: str, name: str) -> type:
    def fail(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(f"{module}.{name} is a stand-in in .lerobot-venv (tools/torchvision_standin)")

    return type(name, (), {"__init__": fail, "__call__": fail, "__module__": module})


def module_getattr(module: ModuleType | str):
    name = module if isinstance(module, str) else module.__name__

    def __getattr__(attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return placeholder(name, attr)

    return __getattr__
