from torchvision._placeholder import module_getattr

__getattr__ = module_getattr(__name__)
from torchvision.models import _utils  # noqa: E402,F401
