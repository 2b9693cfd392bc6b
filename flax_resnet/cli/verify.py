"""``verify``: ``parity.compare`` (or, with --steps, ``parity.compare_training``) of a registered model's torch
and Flax versions, the Flax one filled through the port; with --devices, ``parity.devices.compare_devices`` (N
devices and torch DDP)."""

from __future__ import annotations

import argparse
from typing import Any

from flax_resnet import builders, parity, port, registry, weights
from flax_resnet.cli import options
from flax_resnet.config import ConfigError, check_image_size
from flax_resnet.recipes import RECIPES, Recipe
from flax_resnet.training import engine

# verify keeps every layer's output of both frameworks, in float32 and float64, so memory grows with the batch's
# pixels: 4 images of 64x64 took 3.5 GB for ResNet18 and 10 GB for ResNet50, 4 of 128x128 9.3 GB for ResNet18
# (2-core Xeon, 24 GB). The bound keeps the largest model at about 10 GB.
MAX_BATCH_PIXELS = 4 * 64 * 64


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    model = options.chosen_model(args)
    source = args.weights
    if source is None and model is None:
        raise ConfigError("name the model with --model, or give --weights to infer it from.")
    if source is not None and not source.exists():
        raise ConfigError(f"--weights {source}: no such file or directory.")
    if args.devices is None and args.bn_sync is not None:
        raise ConfigError("--bn-sync chooses the BatchNorm of verify --devices: give --devices N too.")
    if args.devices is not None and args.batch % args.devices:
        raise ConfigError(f"--batch {args.batch} does not split evenly across --devices {args.devices}: give a "
                          f"multiple of {args.devices}.")
    if args.batch * args.image_size ** 2 > MAX_BATCH_PIXELS:
        raise ConfigError(f"--batch {args.batch} of {args.image_size}x{args.image_size} images is beyond verify's "
                          f"memory bound ({MAX_BATCH_PIXELS} pixels: 4 of 64x64, 16 of 32x32; ResNet50 took 10 GB "
                          "there): "
                          "give a smaller --batch or --image-size.")
    torch_model, name, kwargs = weights.load_model(source, "torch", model=model, seed=args.seed)
    check_image_size(name, args.image_size)  # known once the weights name the model
    if args.devices is not None:
        return _compare_devices(args, torch_model, name, kwargs)
    flax_model = builders.build_flax_to_fill(name, kwargs)
    port.load_torch_state_dict(flax_model, torch_model.state_dict())  # the port under test
    origin = f"torch's initialisation, seed {args.seed}" if source is None else str(source)
    print(f"verifying {registry.constructor_call(name, kwargs)} with {origin}", flush=True)
    shape = (args.batch, 3, args.image_size, args.image_size)
    if args.steps is not None:
        report = _compare_training(torch_model, flax_model, RECIPES[registry.get_spec(name).recipe], args.steps,
                                   args.steps_per_epoch, shape, args.seed)
    else:
        report = parity.compare(torch_model, flax_model, dtype="float64" if args.float64 else "float32",
                                input_shape=shape, seed=args.seed)
    print(report.table())
    return 0 if report.ok else 1


def _compare_training(torch_model: Any, flax_model: Any, recipe: Recipe, steps: int, steps_per_epoch: int,
                      shape: tuple[int, int, int, int], seed: int) -> Any:
    """``verify --steps``: the recipe's optimizer and schedule as each framework's trainer builds them."""
    from torch_ref import train as notebook  # torch_ref needs torch, an optional extra

    print(f"recipe {recipe.name}: SGD(lr={recipe.lr}, momentum={recipe.momentum}, weight_decay={recipe.weight_decay}), "
          f"{recipe.schedule} schedule, steps per epoch: {steps_per_epoch}", flush=True)
    return parity.compare_training(
        torch_model, flax_model,
        lambda params: notebook.make_optimizer(params, recipe.lr, recipe.momentum, recipe.weight_decay),
        engine.make_optimizer(recipe, steps_per_epoch), steps=steps,
        torch_scheduler=lambda optimizer: notebook.make_scheduler(optimizer, recipe.schedule, recipe.epochs,
                                                                  recipe.milestones, recipe.gamma),
        steps_per_epoch=steps_per_epoch, input_shape=shape, seed=seed)


def _compare_devices(args: argparse.Namespace, torch_model: Any, name: str, kwargs: dict[str, Any]) -> int:
    """``verify --devices N``: K steps on one device, on N devices with every parallel kind, and with torch DDP on
    N processes, compared with DDP (``parity.devices.compare_devices``)."""
    from flax_resnet.parity import devices

    steps = args.steps or 2
    print(f"verifying {registry.constructor_call(name, kwargs)}: {steps} steps on 1 and {args.devices} devices "
          f"against torch DDP on {args.devices} processes, float64 (compiling; a minute or so on a CPU)", flush=True)
    report = devices.compare_devices(name, kwargs, devices=args.devices, steps=steps,
                                     bn_sync=args.bn_sync != "off", seed=args.seed, batch=args.batch,
                                     image_size=args.image_size, steps_per_epoch=args.steps_per_epoch,
                                     torch_model=torch_model)
    print(report.table())
    return 0 if report.ok else 1
