"""The registered models, in one table: names, constructor arguments, notebook recipes.

Every notebook class has the same name in ``flax_resnet.models`` and ``torch_ref.models``, so one ``MODELS`` line
per name says which constructor arguments it takes (and so which command-line options, one ``MODEL_ARGS`` entry
each), which fixed arguments it gets (``PlainNet`` is always built from ``PlainBlock``) and which recipe it belongs
to. ``flax_resnet.builders`` builds them; this table imports no framework, as ``--help`` reads it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

__all__ = ["MODELS", "MODEL_ARGS", "ModelArg", "ModelSpec", "check_image_size", "constructor_call", "get_spec",
           "model_kwargs", "model_names"]


@dataclasses.dataclass(frozen=True)
class ModelArg:
    """A constructor argument that some models take: its kind and bounds (``check`` refuses a value the model
    cannot take), and how the command line spells it (``flax_resnet.cli.options`` makes the option)."""

    name: str  # the constructor's keyword, e.g. "n_blocks"
    flag: str  # the command-line option, e.g. "--n-blocks"
    kind: type  # int or float, of each value
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_max: bool = False
    nargs: int | None = None
    metavar: str = "N"
    # reads the value back from a torch state_dict's keys (to recognise a .pt file's model); None: cannot
    from_keys: Callable[[Collection[str]], Any] | None = None

    def check(self, value: Any) -> None:
        """``ValueError`` naming the option when ``value`` (or one of its ``nargs`` values) is out of bounds."""
        for v in value if self.nargs else (value,):
            high_ok = self.maximum is None or (v < self.maximum if self.exclusive_max else v <= self.maximum)
            if not isinstance(v, int | float) or (self.minimum is not None and v < self.minimum) or not high_ok:
                bounds = [f">= {self.minimum}"] * (self.minimum is not None) + \
                    [f"{'<' if self.exclusive_max else '<='} {self.maximum}"] * (self.maximum is not None)
                raise ValueError(f"{self.flag} must be {' and '.join(bounds)}, got {v!r}.")


def _blocks_in(keys: Collection[str], prefix: str) -> int:
    """How many blocks the nn.Sequential ``prefix`` holds, from keys like 'prefix.3.conv1.weight'."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


MODEL_ARGS: dict[str, ModelArg] = {
    "n_blocks": ModelArg(
        "n_blocks", "--n-blocks", int, 3,
        "blocks per stage of the notebook-000 models (1 + 6n conv layers); default 3, but 5 with the "
        "plain-vs-residual recipe, as notebook 000 compares them", minimum=1,
        from_keys=lambda keys: _blocks_in(keys, "stage1")),
    "num_blocks": ModelArg(
        "num_blocks", "--num-blocks", int, (1, 1, 1, 1),
        "blocks in each of PlainNet's four layers; default 1 1 1 1 (notebook 004: shallow 1 1 1 1, deep 3 3 3 3)",
        minimum=1, nargs=4, from_keys=lambda keys: tuple(_blocks_in(keys, f"layer{i}") for i in range(1, 5))),
    "p": ModelArg("p", "--dropout-p", float, 0.2, "dropout probability after each block of ResNet18Dropout; "
                  "default 0.2", minimum=0, maximum=1, exclusive_max=True, metavar="X"),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model: its constructor arguments, fixed arguments and notebook recipe."""

    name: str
    args: tuple[str, ...]  # keys of MODEL_ARGS it takes
    recipe: str  # the recipe of its notebook, the default when --recipe is not given
    fixed: Mapping[str, str] = dataclasses.field(default_factory=dict)  # argument -> class name in the module
    same_weights_as: str | None = None  # a variant whose state_dict is another model's (for recognising .pt)
    image_size: int | None = None  # the one input side it takes (its fc layer is sized for it); None: any >= 8


_000, _004 = "plain-vs-residual", "resnet18-cifar"
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("PlainDeepCNN", ("n_blocks",), _000),
    ModelSpec("SimpleResNet", ("n_blocks",), _000),
    ModelSpec("PlainNet", ("num_blocks",), _004, fixed={"block": "PlainBlock"}),
    ModelSpec("ResNet18", (), _004),
    ModelSpec("ResNet34", (), _004),
    ModelSpec("ResNet50", (), _004),
    ModelSpec("ResNet18NoBN", (), _004),
    ModelSpec("ResNet18Dropout", ("p",), _004, same_weights_as="ResNet18"),
    ModelSpec("SimpleNet", (), _004, image_size=32),
)}

# Recipe-specific defaults of model arguments: notebook 000 trains both of its networks at N_BLOCKS = 5.
RECIPE_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {_000: {"n_blocks": 5}}


def model_names() -> list[str]:
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


def model_kwargs(name: str, given: Mapping[str, Any] | None = None, recipe: str | None = None) -> dict[str, Any]:
    """The constructor arguments of ``name``: ``given`` (None values ignored) over recipe and class defaults;
    ``ValueError`` for an argument the model does not take or a value out of its bounds (``ModelArg.check``)."""
    spec = get_spec(name)
    given = {k: v for k, v in (given or {}).items() if v is not None}
    foreign = [MODEL_ARGS[k].flag if k in MODEL_ARGS else k for k in given if k not in spec.args]
    if foreign:
        takes = ", ".join(MODEL_ARGS[a].flag for a in spec.args) or "no model options"
        raise ValueError(f"{name} does not take {', '.join(foreign)} (it takes {takes})")
    for k, v in given.items():
        MODEL_ARGS[k].check(v)
    defaults = RECIPE_MODEL_DEFAULTS.get(recipe or "", {})
    kwargs = {a: given.get(a, defaults.get(a, MODEL_ARGS[a].default)) for a in spec.args}
    return {a: tuple(v) if isinstance(v, list) else v for a, v in kwargs.items()}


def check_image_size(name: str, image_size: int) -> None:
    """``ValueError`` when ``name`` cannot take ``image_size`` x ``image_size`` images: SimpleNet flattens its last
    feature map straight into fc, which is sized for 32x32 inputs (the others pool to 1x1 first)."""
    fixed = get_spec(name).image_size
    if fixed is not None and image_size != fixed:
        raise ValueError(f"{name} takes {fixed}x{fixed} images only (its fc layer is sized for them), not "
                         f"--image-size {image_size}: leave --image-size out or choose another model.")


def constructor_call(name: str, kwargs: Mapping[str, Any]) -> str:
    """``SimpleResNet(n_blocks=1)``: a model as its constructor call, for messages, titles and reports."""
    return f"{name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
