"""The PyTorch reference: the notebooks' models and training loops, kept as the notebooks wrote them."""

try:
    import torch  # noqa: F401
except ModuleNotFoundError as e:  # the core install of flax-resnet has no torch: name the extra that brings it
    if e.name != "torch":
        raise
    raise ModuleNotFoundError("torch_ref is the PyTorch reference and needs torch, which is not installed here: "
                              "pip install 'flax-resnet[torch]'", name="torch") from None

from torch_ref.models import *  # noqa: E402, F403
from torch_ref.models import __all__  # noqa: E402, F401
