"""One 3x3 convolution (stride 1, padding 1, no bias), forward + input and weight gradients, at batch 128 and
the three stage shapes of SimpleResNet: XLA's ``lax.conv`` against the image-patches path of
``flax_resnet.conv_patches`` (slices + one dot), against patches from ``lax.conv_general_dilated_patches``, and
torch's ``conv2d`` (NCHW), in float64 and float32. Prints a Markdown table of median milliseconds.

    PYTHONPATH=$PWD python benchmarks/conv_float64.py [--rounds 5] [--batch 128]

Variants are interleaved round by round (each round times every variant once, after one warm-up call each), so
a load change on a shared machine spoils all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flax_resnet.conv_patches import conv_as_patches
from flax_resnet.training import cpu

SHAPES = ((32, 16), (16, 32), (8, 64))  # (H = W, C): SimpleResNet's three stages
NHWC = ("NHWC", "HWIO", "NHWC")


def lax_conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)


def slices(x, w):
    return conv_as_patches(x, w, strides=(1, 1), padding=((1, 1), (1, 1)), rhs_dilation=(1, 1))


def lax_patches(x, w):
    # the patches' features come out (C, kh, kw)-major: the kernel is reordered to match
    p = lax.conv_general_dilated_patches(x, w.shape[:2], (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)
    return p @ jnp.transpose(w, (2, 0, 1, 3)).reshape(-1, w.shape[-1])


def fwd_bwd(conv, compiler_options=None):
    def step(x, w, ct):
        y, vjp = jax.vjp(conv, x, w)
        return (y, *vjp(ct))
    return jax.jit(step, compiler_options=compiler_options)


def torch_fwd_bwd(x, w, ct):
    import torch

    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = torch.nn.functional.conv2d(x, w, padding=1)
    y.backward(ct)
    return y, x.grad, w.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtypes", nargs="+", default=["float64", "float32"])
    ap.add_argument("--compiler-options", choices=("runner", "none"), default="runner",
                    help="'runner': the XLA:CPU options the training runners compile with "
                         "(flax_resnet.training.cpu.COMPILER_OPTIONS); 'none': XLA's defaults")
    args = ap.parse_args()
    jax.config.update("jax_enable_x64", True)
    import torch

    options = cpu.compiler_options(jax.devices()[0]) if args.compiler_options == "runner" else None
    variants = {"lax.conv": fwd_bwd(lax_conv, options), "patches: slices + dot": fwd_bwd(slices, options),
                "patches: conv_general_dilated_patches + dot": fwd_bwd(lax_patches, options)}
    print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), batch {args.batch}, XLA options: {options}, "
          f"median of {args.rounds} rounds, ms\n")
    print("| dtype | N x H x W x C | " + " | ".join([*variants, "torch conv2d"]) + " |")
    print("| --- | --- |" + " ---: |" * (len(variants) + 1))
    rng = np.random.default_rng(0)
    for dtype in args.dtypes:
        for hw, c in SHAPES:
            x = rng.standard_normal((args.batch, hw, hw, c)).astype(dtype)
            w = (rng.standard_normal((3, 3, c, c)) / np.sqrt(9 * c)).astype(dtype)
            ct = rng.standard_normal((args.batch, hw, hw, c)).astype(dtype)
            inputs = [jnp.asarray(a) for a in (x, w, ct)]
            t_inputs = [torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                        torch.from_numpy(w.transpose(3, 2, 0, 1).copy()),
                        torch.from_numpy(ct.transpose(0, 3, 1, 2).copy())]
            reference = [np.asarray(a) for a in variants["lax.conv"](*inputs)]
            calls = {name: (lambda f=f, a=inputs: jax.block_until_ready(f(*a))) for name, f in variants.items()}
            calls["torch conv2d"] = lambda a=t_inputs: torch_fwd_bwd(*a)
            for name, call in calls.items():
                out = call()  # warm-up (compiles), and a check that every variant computes the same thing
                if name != "torch conv2d":
                    for a, b in zip(out, reference, strict=True):
                        err = np.abs(np.asarray(a) - b).max() / np.abs(b).max()
                        assert err < (1e-12 if dtype == "float64" else 1e-5), (name, err)
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.rounds):
                for name, call in calls.items():
                    t0 = time.perf_counter()
                    call()
                    times[name].append(1e3 * (time.perf_counter() - t0))
            cells = [f"{statistics.median(times[name]):.0f}" for name in calls]
            print(f"| {dtype} | {args.batch} x {hw} x {hw} x {c} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
