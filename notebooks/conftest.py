"""``pytest`` runs the notebooks (``--nbmake``, see pyproject.toml) in their quick mode: synthetic data, small
models, about a minute and a half each on 2 cores. ``FLAX_RESNET_QUICK=0 pytest notebooks`` runs the real
settings on CIFAR-10 instead. The notebooks' kernels inherit this process's environment."""

import os

os.environ.setdefault("FLAX_RESNET_QUICK", "1")
