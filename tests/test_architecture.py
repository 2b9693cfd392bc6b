"""The shape of the code: one-way imports, nothing global changed at import, a PyTorch reference without JAX,
and the seams the training loop calls (the batch-size check comes before any compilation)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("flax_resnet", "torch_ref")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``name`` imports, at import time or inside its functions: an import deferred into a
    function still ties the two modules together, so it counts (a lazy import must not hide a cycle)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:  # ``from package import module`` depends on the module, not on the package
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    result = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            result.add(target)
    return result


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: _imports(path, name, set(modules)) for name, path in modules.items()}
    # a package imports its own submodules by design (re-exports); a submodule importing its package's
    # __init__ back is the cycle this looks for
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue  # the package's own submodule
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_only_the_command_line_imports_argparse():
    """Library functions take typed settings, never a parsed ``argparse.Namespace``: argparse stays in
    ``flax_resnet.cli``."""
    users = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if "argparse" in names:
                users.add(name)
    assert users and all(name == "flax_resnet.cli" or name.startswith("flax_resnet.cli.") for name in users), users


def test_torch_ref_imports_only_torch_and_numpy():
    """Every torch_ref module imports with jax and flax unavailable (None in sys.modules makes any import of
    them fail), and names no flax_resnet module."""
    code = textwrap.dedent("""
        import importlib, pkgutil, sys
        for blocked in ("jax", "jaxlib", "flax", "optax", "orbax", "flax_resnet"):
            sys.modules[blocked] = None
        import torch_ref
        names = [m.name for m in pkgutil.iter_modules(torch_ref.__path__, "torch_ref.")]
        for name in names:
            importlib.import_module(name)
        print(" ".join(sorted(names)))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert {"torch_ref.data", "torch_ref.he_init", "torch_ref.models", "torch_ref.train"} <= set(out.stdout.split())


def test_importing_every_module_changes_nothing_global():
    """``sys.unraisablehook``, the asyncio and absl loggers and the warnings filters are as they were after importing
    every flax_resnet and torch_ref module (measured against the state after importing their dependencies, which
    may change these themselves)."""
    code = textwrap.dedent("""
        import importlib, logging, sys, warnings
        for dep in ("numpy", "jax", "flax.nnx", "optax", "torch", "safetensors.numpy", "tqdm", "matplotlib",
                    "tensorflow_datasets"):
            importlib.import_module(dep)

        def snapshot():
            loggers = {}
            for name in ("", "asyncio", "absl", "jax", "flax"):
                logger = logging.getLogger(name)
                loggers[name] = (list(logger.filters), list(logger.handlers), logger.level, logger.propagate)
            return sys.unraisablehook, sys.excepthook, loggers, list(warnings.filters)

        before = snapshot()
        for name in sys.argv[1:]:
            importlib.import_module(name)
        after = snapshot()
        assert before == after, (before, after)
        print("ok", len(sys.argv) - 1)
    """)
    names = sorted(_modules())
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["ok", str(len(names))]


def test_a_batch_size_the_devices_cannot_share_fails_before_compiling(tmp_path):
    """The command the issue tried: 3 devices, a batch whose short last batch cannot be split. The runner's
    ``check_batch_sizes`` runs first (the loop calls it unconditionally), so nothing is compiled or trained: the
    runner's step and state placement are replaced by functions that fail the test if reached."""
    code = textwrap.dedent("""
        import sys
        from flax_resnet import cli
        from flax_resnet.training import parallel

        def reached(*args, **kwargs):
            raise SystemExit("REACHED " + sys.argv[1])

        parallel.ShardMapRunner.train_step = reached
        parallel.ShardMapRunner.put_state = reached
        sys.exit(cli.main(["train", "--model", "SimpleResNet", "--n-blocks", "1", "--dataset", "synthetic",
                           "--train-samples", sys.argv[1], "--test-samples", "100", "--batch-size", "128",
                           "--epochs", "1", "--parallel", "shard_map", "--no-progress", "--out", sys.argv[2]]))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=3", "JAX_PLATFORMS": "cpu"}
    for samples, hint in (("1000", "do not divide by 3"), ("1002", "--batch-size 126 or 129")):
        out = subprocess.run([sys.executable, "-c", code, samples, str(tmp_path / samples)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 1, (out.stdout, out.stderr)
        assert "REACHED" not in out.stdout + out.stderr
        assert "error:" in out.stderr and hint in " ".join(out.stderr.split()), out.stderr
        assert "Traceback" not in out.stderr
