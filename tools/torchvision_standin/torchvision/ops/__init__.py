from torchvision._placeholder import module_getattr

__getattr__ = module_getattr(__name__)
from torchvision.ops import misc  # noqa: E402,F401
