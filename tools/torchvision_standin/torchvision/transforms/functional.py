from torchvision._placeholder import module_getattr
from torchvision.transforms import InterpolationMode  # noqa: F401

__getattr__ = module_getattr(__name__)
