"""First contact: the core install works without the extras, each command that needs one names the pip install
that brings it, ``--help`` is quick and imports no framework, and the program calls itself what the user typed.

The extras are made missing by blocking their imports in a child process (``sys.modules[name] = None``: ``import``
then fails and ``importlib.util.find_spec`` finds nothing, as on a machine without them)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flax_resnet.errors import EXTRAS

ROOT = Path(__file__).resolve().parent.parent
# pyproject.toml's extras -> the top-level modules they install
EXTRA_MODULES = {extra: tuple(m for m, e in EXTRAS.items() if e == extra) for extra in set(EXTRAS.values())}
ALL_EXTRAS = tuple(m for modules in EXTRA_MODULES.values() for m in modules)
TINY = ["--dataset", "synthetic", "--model", "SimpleResNet", "--n-blocks", "1", "--train-samples", "64",
        "--test-samples", "16", "--batch-size", "32", "--epochs", "1", "--no-progress"]


def _run(code: str, blocked: tuple[str, ...], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    prelude = f"import sys\nfor _m in {blocked!r}:\n    sys.modules[_m] = None\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_core_install_builds_ports_and_trains_without_torch_tfds_or_matplotlib(tmp_path):
    """The models, the port (a mapping and a .safetensors file) and a short Flax training through the command
    line, with every extra missing; the run writes history and checkpoint, and says why there is no curves.png and
    no TensorBoard event files."""
    code = f"""
        import json
        from pathlib import Path

        import numpy as np
        from flax_resnet import SimpleResNet, load_torch_state_dict, weights
        from flax_resnet.cli import main
        from flax_resnet.port import to_numpy_state_dict
        from flax import nnx

        a, b = SimpleResNet(n_blocks=1, rngs=nnx.Rngs(0)), SimpleResNet(n_blocks=1, rngs=nnx.Rngs(1))
        load_torch_state_dict(b, to_numpy_state_dict(a))
        weights.save(a, "w.safetensors")
        c = SimpleResNet(n_blocks=1, rngs=nnx.Rngs(2))
        weights.load("w.safetensors", c)
        x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
        for m in (a, b, c):
            m.eval()
        assert np.array_equal(a(x), b(x)) and np.array_equal(a(x), c(x))
        code = main(["train", *{TINY!r}, "--out", "run"])
        assert code == 0, code
        assert Path("run/history.json").is_file() and not Path("run/curves.png").exists()
        assert not list(Path("run").glob("events.out.tfevents.*"))
        assert any(Path("run/checkpoints").iterdir())
        print("blocked still unimported:", all(sys.modules[m] is None for m in {ALL_EXTRAS!r}))
    """
    proc = _run(code, ALL_EXTRAS, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "blocked still unimported: True" in proc.stdout
    assert "note: no curves.png without matplotlib: pip install 'flax-resnet[plots]'" in proc.stdout
    assert ("note: no TensorBoard event files without tensorboardX: pip install 'flax-resnet[tensorboard]'"
            in proc.stdout)


@pytest.mark.parametrize(("extra", "argv"), [
    ("torch", ["train", *TINY, "--framework", "torch"]),
    ("torch", ["train", *TINY, "--init-from", "w.pt"]),
    ("torch", ["port", "--from", "w.pt", "--to", "ckpt"]),
    ("torch", ["bench", "--quick"]),
    ("torch", ["compare", "--quick"]),
    ("torch", ["he-init", "--quick"]),
    ("data", ["train", "--dataset", "cifar10", "--no-download"]),
    ("data", ["depth", "--quick", "--dataset", "cifar10"]),
    ("plots", ["ablation", "--quick"]),
], ids=lambda v: v if isinstance(v, str) else " ".join(v[:2]))
def test_a_command_that_needs_a_missing_extra_says_which_in_one_line(extra, argv, tmp_path):
    """Exit 1 at once, one message on stderr (wrapped at 110 columns) naming the ``pip install`` that fixes it,
    nothing written."""
    (tmp_path / "w.pt").write_bytes(b"")  # the check comes before the file is read
    out = tmp_path / "out"
    argv = [*argv, "--out", str(out)] if argv[0] not in ("port", "bench") else argv
    proc = _run(f"from flax_resnet.cli import main\nraise SystemExit(main({argv!r}))", EXTRA_MODULES[extra], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and all(line.startswith("  ") for line in lines[1:]), proc.stderr
    assert f"pip install 'flax-resnet[{extra}]'" in " ".join(proc.stderr.split())
    assert not out.exists() and not (tmp_path / "ckpt").exists()


def test_compare_on_the_core_install_names_both_extras_it_needs(tmp_path):
    """compare needs torch and matplotlib: one message naming both, not one extra per attempt."""
    out = tmp_path / "out"
    argv = ["compare", "--quick", "--out", str(out)]
    proc = _run(f"from flax_resnet.cli import main\nraise SystemExit(main({argv!r}))", ALL_EXTRAS, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    extras = re.findall(r"pip install 'flax-resnet\[([a-z,]+)\]'", " ".join(proc.stderr.split()))
    assert len(extras) == 1 and set(extras[0].split(",")) == {"torch", "plots"}, proc.stderr
    assert not out.exists()


def test_torch_ref_and_to_torch_state_dict_without_torch_name_the_extra_and_what_to_use(tmp_path):
    """``import torch_ref`` names the [torch] extra (not a bare "No module named 'torch'"); the message of
    ``to_torch_state_dict`` names its torch-free twin by a name that can be imported."""
    code = """
        import importlib
        try:
            import torch_ref
        except ModuleNotFoundError as e:
            print("torch_ref:", e)
        from flax import nnx
        from flax_resnet import SimpleResNet, to_torch_state_dict
        from flax_resnet.errors import FlaxResnetError
        try:
            to_torch_state_dict(SimpleResNet(n_blocks=1, rngs=nnx.Rngs(0)))
        except FlaxResnetError as e:
            named = [w.strip("(),.:") for w in str(e).split() if "to_numpy_state_dict" in w]
            module, _, name = named[0].rpartition(".")
            print("named:", named, callable(getattr(importlib.import_module(module or "flax_resnet"), name, None)))
    """
    proc = _run(code, ("torch",), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch_ref:" in proc.stdout and "pip install 'flax-resnet[torch]'" in proc.stdout, proc.stdout
    assert "named: ['flax_resnet.port.to_numpy_state_dict'] True" in proc.stdout, proc.stdout


def test_help_of_every_command_imports_no_framework_and_takes_under_a_second(tmp_path):
    code = """
        import json, sys
        from flax_resnet import cli

        parser = cli.build_parser()
        commands = [a for a in parser._subparsers._group_actions][0].choices
        for argv in [["--help"], *([name, "--help"] for name in commands)]:
            try:
                cli.main(argv)
            except SystemExit as e:
                assert e.code == 0, (argv, e.code)
        heavy = ("jax", "flax", "optax", "torch", "tensorflow_datasets", "matplotlib")
        print(json.dumps({"commands": sorted(commands), "imported": [m for m in heavy if m in sys.modules]}))
    """
    proc = _run(code, (), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["imported"] == [] and len(found["commands"]) >= 9, found
    # the fastest of three runs: a loaded machine slows a run, it never speeds one up
    walls = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "train.py"), "train", "--help"], check=True, capture_output=True)
        walls.append(time.perf_counter() - t0)
    assert min(walls) < 1.0, walls


@pytest.mark.parametrize(("launch", "expected"), [
    (["train.py"], "usage: python train.py"),
    (["-m", "flax_resnet"], "usage: python -m flax_resnet"),
])
def test_usage_names_the_program_as_it_was_started(launch, expected):
    proc = subprocess.run([sys.executable, *launch, "port", "--help"], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    assert proc.stdout.startswith(expected + " port"), proc.stdout[:200]
    assert f"{expected.removeprefix('usage: ')} port --from" in proc.stdout  # the examples too


def test_the_console_script_names_itself(tmp_path):
    """``flax-resnet`` as pip installs it (a script whose name is the program's)."""
    script = tmp_path / "flax-resnet"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom flax_resnet.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True, env=env).stdout
    assert out.startswith("usage: flax-resnet ") and "`flax-resnet COMMAND --help`" in out


def test_the_package_exports_the_models_lazily_and_has_one_version():
    import importlib.metadata
    import tomllib

    import flax_resnet
    from flax_resnet import models

    assert list(flax_resnet._MODELS) == list(models.__all__)
    assert set(flax_resnet.__all__) <= set(dir(flax_resnet))
    assert flax_resnet.ResNet18 is models.ResNet18
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(EXTRAS.values()) <= set(project["optional-dependencies"])  # the extras the errors name exist
    version = project["version"]
    assert flax_resnet.__version__ == importlib.metadata.version("flax-resnet") == version
