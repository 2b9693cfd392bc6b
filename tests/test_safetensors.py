"""PyTorch weights as .safetensors, both ways, without torch: read into the Flax models where torch cannot even be
imported, written so that torch's ``load_state_dict(strict=True)`` takes them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flax_resnet import builders, port, weights

REPO = Path(__file__).resolve().parent.parent
# float32, test-only: 10x tighter than parity.TOLERANCES["float32"].values (1e-4, for any model and input). The same
# weights through one eval forward of SimpleResNet(1) differ by rounding only: measured 1.5e-8 (CPU), as
# parity_tests/helpers.py's F32_TOL.
F32_TOL = 1e-5


def test_a_torch_written_safetensors_loads_into_flax_without_torch(tmp_path):
    """torch writes the file; a process where ``import torch`` fails loads it into the Flax model (through the
    library call and through ``train.py port``) and gives torch's outputs to float32 rounding."""
    torch.manual_seed(0)
    model = builders.build_torch("SimpleResNet", {"n_blocks": 1}).eval()
    weights = tmp_path / "w.safetensors"
    save_file(model.state_dict(), weights)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.save(tmp_path / "x.npy", x)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any import of torch fails
        import numpy as np
        import jax.numpy as jnp
        from flax_resnet import builders, registry, weights
        from flax_resnet.cli import main
        model = builders.build_flax("SimpleResNet", {{"n_blocks": 1}})
        weights.load({str(weights)!r}, model)
        model.eval()
        x = np.load({str(tmp_path / "x.npy")!r}).transpose(0, 2, 3, 1)
        np.save({str(tmp_path / "y.npy")!r}, np.asarray(model(jnp.asarray(x))))
        sys.exit(main(["port", "--from", {str(weights)!r}, "--to", {str(tmp_path / "ckpt")!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "y.npy")
    assert np.max(np.abs(got - expected)) <= F32_TOL * max(1.0, float(np.max(np.abs(expected))))
    assert (tmp_path / "ckpt").is_dir()


def test_flax_weights_written_as_safetensors_load_into_torch_strictly(tmp_path):
    flax_model = builders.build_flax("SimpleResNet", {"n_blocks": 1}, seed=3)
    path = weights.save(flax_model, tmp_path / "out.safetensors")
    torch_model = builders.build_torch("SimpleResNet", {"n_blocks": 1})
    result = torch_model.load_state_dict(load_file(path), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in port.to_torch_state_dict(flax_model).items():
        assert torch.equal(torch_model.state_dict()[key], value), key
    assert torch_model.state_dict()["bn1.num_batches_tracked"].dtype == torch.int64


def test_port_command_writes_safetensors_from_a_checkpoint(tmp_path):
    from flax_resnet.cli import main

    flax_model = builders.build_flax("SimpleResNet", {"n_blocks": 1}, seed=5)
    weights.save(flax_model, tmp_path / "ckpt", {"model": "SimpleResNet", "model_kwargs": {"n_blocks": 1}})
    assert main(["port", "--from", str(tmp_path / "ckpt"), "--to", str(tmp_path / "w.safetensors")]) == 0
    written = load_file(tmp_path / "w.safetensors")
    expected = port.to_torch_state_dict(flax_model)
    assert sorted(written) == sorted(expected)
    assert all(torch.equal(written[k], v) for k, v in expected.items())


def test_a_damaged_safetensors_file_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(port.PortError, match="cannot read .*bad.safetensors as a safetensors file"):
        weights.load(bad, builders.build_flax_to_fill("SimpleResNet", {"n_blocks": 1}))
