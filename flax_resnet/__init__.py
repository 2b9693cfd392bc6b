"""flax-resnet: the notebooks' ResNets in Flax NNX, with weight porting to and from PyTorch.

Importing this package imports neither torch nor tensorflow-datasets: those load only where they are used.
"""

from flax_resnet.dtypes import cast_floating
from flax_resnet.models import *  # noqa: F403
from flax_resnet.models import __all__ as _model_names
from flax_resnet.port import (
    PortError,
    load_torch_state_dict,
    save_torch_state_dict,
    to_torch_state_dict,
    torch_keys,
)

__all__ = [*_model_names, "PortError", "cast_floating", "load_torch_state_dict", "save_torch_state_dict",
           "to_torch_state_dict", "torch_keys"]
__version__ = "0.1.0"
