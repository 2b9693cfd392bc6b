"""The PyTorch reference: the notebooks' models and training loops, kept as the notebooks wrote them."""

from torch_ref.models import *  # noqa: F403
from torch_ref.models import __all__  # noqa: F401
