from torchvision._placeholder import module_getattr

__getattr__ = module_getattr(__name__)
from torchvision.transforms.v2 import functional  # noqa: E402,F401
