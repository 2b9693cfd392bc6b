"""The option table (``flax_resnet.cli.options``): each option declared once, and ``run_config``'s order of
precedence (defaults, then a command's preset, then the user's values)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from flax_resnet.cli import options
from flax_resnet.config import ConfigError, Preset

ROOT = Path(__file__).resolve().parent.parent


def _parse(argv: list[str], *names: str) -> argparse.Namespace:
    names = names or tuple(n for n in options.OPTIONS if n not in ("source", "target"))  # --from, --to: required
    return options.add(argparse.ArgumentParser(), *names).parse_args(argv)


def test_every_flag_is_declared_once():
    flags = [flag for option in options.OPTIONS.values() for flag in option.flags]
    assert len(flags) == len(set(flags))


def test_defaults_come_from_the_config_and_the_recipe():
    config = options.run_config(_parse([]))
    assert (config.model.name, config.recipe.name, config.framework, config.seed) == (
        "ResNet18", "resnet18-cifar", "jax", 0)
    assert config.output.out_dir == Path("runs/ResNet18-resnet18-cifar-jax")
    assert config.parallel.is_default and config.output.progress and config.data.download


def test_the_users_values_win_over_the_preset():
    preset = Preset("quick", recipe={"epochs": 2, "batch_size": 8}, data={"dataset": "synthetic"},
                    model_kwargs={"n_blocks": 1})
    args = _parse(["--model", "SimpleResNet", "--batch-size", "4", "--n-blocks", "2", "--no-download",
                   "--bn-sync", "off", "--no-progress"])
    config = options.run_config(args, preset=preset)
    assert config.recipe.name == "plain-vs-residual"  # the model's notebook's recipe
    assert (config.recipe.epochs, config.recipe.batch_size, config.recipe.milestones) == (2, 4, (1,))
    assert config.model.kwargs == {"n_blocks": 2} and config.data.dataset == "synthetic"
    assert not config.data.download and not config.parallel.bn_sync and not config.output.progress
    assert config.output.out_dir == Path("runs/SimpleResNet-plain-vs-residual-jax-synthetic")


@pytest.mark.parametrize("argv, words", [
    (["--model", "ResNet18", "--n-blocks", "2"], ["ResNet18", "--n-blocks"]),
    (["--framework", "torch", "--parallel", "pmap"], ["--parallel", "--framework jax"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
    (["--coordinator", "h:1"], ["--num-processes"]),
    (["--parallel", "jit", "--bn-sync", "off"], ["--bn-sync off", "shard_map", "pmap"]),
])
def test_settings_that_cannot_go_together_are_a_config_error(argv, words):
    with pytest.raises(ConfigError) as e:
        options.run_config(_parse(argv))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_help_imports_no_heavy_module():
    code = ("import sys\nfrom flax_resnet.cli import main\ntry:\n    main(['train', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint([m for m in ('jax', 'torch', 'tensorflow_datasets', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:] + out.stderr[-2000:]


def test_shared_flags_come_from_the_table():
    """A flag that two commands take is the table's (one declaration, one meaning); only an experiment's own
    options (one command each) are declared beside it."""
    from flax_resnet import cli

    every = options.add(argparse.ArgumentParser(), *options.OPTIONS)  # --augment brings --no-augment
    table = {flag for action in every._actions for flag in action.option_strings}
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    takers: dict[str, list[str]] = {}
    for name, parser in commands.items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    takers.setdefault(flag, []).append(name)
    shared = {flag: names for flag, names in takers.items() if len(names) > 1}
    assert shared and set(shared) <= table, {f: n for f, n in shared.items() if f not in table}
    assert set(takers["--batch"]) == {"verify", "he-init", "landscape"} and "verify" not in takers["--batch-size"]
