"""``flax_resnet.weights``: one entry point for every source (a mapping, .safetensors, .pt, a checkpoint directory of
either framework) into either framework's model, bit for bit, and one error for weights that do not fit."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from flax_resnet import builders, port, weights
from flax_resnet.dtypes import cast_floating
from flax_resnet.errors import FlaxResnetError
from flax_resnet.port import PortError
from flax_resnet.store import CheckpointError, CheckpointStore

SMALL = ("SimpleResNet", {"n_blocks": 1})
META = {"model": "SimpleResNet", "model_kwargs": {"n_blocks": 1}}


def trained_torch(name: str = "SimpleResNet", kwargs: dict | None = None) -> torch.nn.Module:
    """A torch model whose BatchNorm statistics and counters moved away from their initial values."""
    model = builders.build_torch(name, kwargs or {"n_blocks": 1}, seed=0).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 16, 16))
    return model


def arrays_of(model) -> dict[str, np.ndarray]:
    """A model of either framework as torch-layout NumPy arrays."""
    if isinstance(model, torch.nn.Module):
        return {k: v.numpy() for k, v in model.state_dict().items()}
    return dict(port.to_numpy_state_dict(model))


def assert_same(model, expected: dict[str, np.ndarray]) -> None:
    got = arrays_of(model)
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key


def test_every_source_fills_both_frameworks_bit_for_bit(tmp_path):
    """Each source into a Flax and a torch model, by ``load`` and by ``load_model`` (the model inferred or read
    from the checkpoint); ``save`` picks the form from the destination's name."""
    original = trained_torch()
    expected = arrays_of(original)
    flax_twin = builders.build_flax_to_fill(*SMALL)
    port.load_torch_state_dict(flax_twin, original.state_dict())
    sources = {
        "torch mapping": original.state_dict(),
        "numpy mapping": expected,
        ".safetensors": weights.save(original, tmp_path / "w.safetensors"),
        ".pt": weights.save(flax_twin, tmp_path / "w.pt"),
        "torch checkpoint": weights.save(original, tmp_path / "torch-ckpt", META),
        "flax checkpoint": weights.save(flax_twin, tmp_path / "flax-ckpt", META),
    }
    assert (tmp_path / "w.safetensors").read_bytes()[8:9] == b"{"  # safetensors: a length, then a JSON header
    assert (tmp_path / "w.pt").read_bytes()[:2] == b"PK"  # torch.save's zip
    assert weights.read_meta(tmp_path / "torch-ckpt")["framework"] == "torch"
    assert weights.read_meta(tmp_path / "flax-ckpt") == {"framework": "jax", **META}
    assert weights.read_meta(tmp_path / "w.pt") == {}
    for source in sources.values():
        for model in (builders.build_flax_to_fill(*SMALL), builders.build_torch(*SMALL)):
            weights.load(source, model)
            assert_same(model, expected)
    # the model inferred from a file's keys and shapes (which traces every registered model: once), read from a
    # checkpoint's record, or named
    for what, framework, given in ((".safetensors", "jax", None), ("torch checkpoint", "jax", None),
                                   ("flax checkpoint", "torch", None), ("numpy mapping", "torch", SMALL)):
        model, name, kwargs = weights.load_model(sources[what], framework, model=given)
        assert (name, kwargs) == SMALL, what
        assert_same(model, expected)


def test_a_float64_flax_checkpoint_reaches_torch_in_float64(tmp_path):
    """Its Flax twin is built in float64 within a scope, so nothing is rounded to float32 on the way and x64 is
    left as it was."""
    with jax.enable_x64(True):
        model = cast_floating(builders.build_flax_to_fill(*SMALL), "float64")
        port.load_torch_state_dict(model, trained_torch().double().state_dict())
        expected = arrays_of(model)
        weights.save(model, tmp_path / "ckpt", {**META, "dtype": "float64"})
    assert expected["conv1.weight"].dtype == np.float64
    x64 = jax.config.read("jax_enable_x64")
    torch_model = builders.build_torch(*SMALL).double()
    weights.load(tmp_path / "ckpt", torch_model)
    assert_same(torch_model, expected)
    assert jax.config.read("jax_enable_x64") == x64


def test_weights_of_another_model_name_what_differs_and_the_options_that_fit(tmp_path):
    other = trained_torch("PlainDeepCNN", {"n_blocks": 1}).state_dict()
    for model in (builders.build_flax_to_fill(*SMALL), builders.build_torch(*SMALL)):
        before = arrays_of(model)
        with pytest.raises(PortError) as info:
            weights.load(other, model)
        message = str(info.value)
        assert "does not fit SimpleResNet" in message and "issing key" in message, message
        assert "pass --model PlainDeepCNN --n-blocks 1" in message, message
        assert_same(model, before)
    # the model's own keys and shapes, a value that does not fit: no other model to point at
    sd = trained_torch().state_dict()
    sd["bn1.num_batches_tracked"] = torch.tensor(2**31, dtype=torch.int64)
    with pytest.raises(PortError) as info:
        weights.load(sd, builders.build_flax_to_fill(*SMALL))
    assert "int32" in str(info.value) and "--model" not in str(info.value)
    # a Flax checkpoint into a Flax model of other arguments: the store's list of misfits and the options
    weights.save(builders.build_flax_to_fill(*SMALL), tmp_path / "ckpt", META)
    bigger = builders.build_flax_to_fill("SimpleResNet", {"n_blocks": 2})
    with pytest.raises(CheckpointError) as info:
        weights.load(tmp_path / "ckpt", bigger)
    assert "missing" in str(info.value) and "pass --model SimpleResNet --n-blocks 1" in str(info.value)


def test_load_model_refuses_another_model_before_reading_the_arrays(tmp_path, monkeypatch):
    weights.save(builders.build_flax_to_fill(*SMALL), tmp_path / "ckpt", META)
    monkeypatch.setattr(CheckpointStore, "read", lambda *a, **k: pytest.fail("the arrays were read"))
    with pytest.raises(FlaxResnetError, match=r"holds weights of SimpleResNet\(n_blocks=1\), not of "
                                              r"SimpleResNet\(n_blocks=2\); pass --model SimpleResNet --n-blocks 1"):
        weights.load_model(tmp_path / "ckpt", "jax", model=("SimpleResNet", {"n_blocks": 2}))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        weights.load_model(tmp_path / "missing.pt", "torch")


def test_the_port_takes_mappings_and_points_files_to_weights_load(tmp_path):
    with pytest.raises(PortError, match=r"weights.load\(path, model\)"):
        port.load_torch_state_dict(builders.build_flax_to_fill(*SMALL), str(tmp_path / "w.safetensors"))


def test_torch_weights_leave_a_dropout_models_rng_state_to_the_seed(monkeypatch):
    """torch weights hold no RNG state, so a Flax model with dropout is built from the seed (its initialisers run);
    a Flax checkpoint, or a model without RNG state, is built without them (``build_flax_to_fill``)."""
    from flax import nnx

    class WithDropout(nnx.Module):  # stands in for ResNet18Dropout, 11M parameters to build
        def __init__(self) -> None:
            self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(0))

    seeded = []
    monkeypatch.setattr(builders, "build_flax_to_fill", lambda name, kwargs: WithDropout())
    monkeypatch.setattr(builders, "build_flax", lambda name, kwargs, seed: seeded.append(seed) or WithDropout())
    weights._build("jax", "ResNet18Dropout", {}, 7, "flax")
    assert seeded == []
    weights._build("jax", "ResNet18Dropout", {}, 7, "torch")
    assert seeded == [7]
