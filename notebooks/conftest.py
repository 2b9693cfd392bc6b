"""``pytest`` runs the notebooks (``--nbmake``, see pyproject.toml) in their quick mode: synthetic data, small
models, about one minute for notebook 000 and two for notebook 004 on 2 cores shared with other work (measured:
52-82 s and 105-135 s). ``FLAX_RESNET_QUICK=0 pytest notebooks`` runs the real settings on CIFAR-10 instead. The
notebooks' kernels inherit this process's environment."""

import os

os.environ.setdefault("FLAX_RESNET_QUICK", "1")
