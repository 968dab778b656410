from torchvision._placeholder import module_getattr

__version__ = "0.0.0+standin"
__getattr__ = module_getattr(__name__)
from torchvision import io, models, ops, transforms  # noqa: E402,F401
