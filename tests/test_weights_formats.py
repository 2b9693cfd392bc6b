"""Weights files as a new user hands them over (issue 25: 1, 4, 5, 7, 11, 13): the format is told by the file's
first bytes (and, to write, by its suffix in any case); half-precision weights load cast to the model's dtype;
the usual torch wrappers are unwrapped with a note, and weights no registered model fits get one line naming the
nearest; a read-only --to is said to be one. Through the command line, as the user meets them, or the public API."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from cli_run import one_error, run_main

from flax_resnet import builders, errors, layers, parity, port, weights
from flax_resnet.dtypes import cast_floating

SMALL = ("SimpleResNet", {"n_blocks": 1})
MODEL = ["--model", "SimpleResNet", "--n-blocks", "1"]  # saves inferring the model (1-3 s) where that is not tested
VERIFY_SMALL = ["--batch", "2", "--image-size", "16"]




@pytest.fixture(scope="module")
def torch_weights() -> dict[str, torch.Tensor]:
    return builders.build_torch(*SMALL, seed=0).state_dict()


def same_arrays(model, expected: dict[str, torch.Tensor]) -> bool:
    got = port.to_numpy_state_dict(model) if not isinstance(model, torch.nn.Module) else model.state_dict()
    return list(got) == list(expected) and all(
        np.array_equal(np.asarray(got[k], np.float64), expected[k].double().numpy()) for k in expected)


# ---------------------------------------------------------------------------------------------- 1, 13
def test_port_writes_the_format_its_suffix_names_in_any_case_and_refuses_another(tmp_path, torch_weights, capsys):
    source = tmp_path / "src.safetensors"
    safetensors.torch.save_file(torch_weights, source)
    old = os.umask(0o027)  # not the usual 022, so that a mode that merely happens to be 0644 cannot pass
    try:
        assert run_main(["port", "--from", str(source), "--to", str(tmp_path / "out.SAFETENSORS"), *MODEL]) == 0
    finally:
        os.umask(old)
    written = (tmp_path / "out.SAFETENSORS").read_bytes()
    assert written[8:9] == b"{" and written[:2] != b"PK"  # a safetensors header, not a torch zip (nor a directory)
    assert stat.S_IMODE((tmp_path / "out.SAFETENSORS").stat().st_mode) == 0o640  # the umask's, like .pt
    capsys.readouterr()
    for bad in ("x.safetensor", "x.npz"):
        assert run_main(["port", "--from", str(source), "--to", str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err
        assert f"--to {tmp_path / bad}" in err and ".safetensors" in err and "suffix" in err, err
        assert not (tmp_path / bad).exists()


def test_a_file_is_read_as_its_first_bytes_say_whatever_its_name(tmp_path, torch_weights):
    safetensors.torch.save_file(torch_weights, tmp_path / "s.safetensors")
    torch.save(torch_weights, tmp_path / "t.pt")
    misnamed = {"W.SAFETENSORS": "s.safetensors", "safetensors.pt": "s.safetensors", "torch.safetensors": "t.pt",
                "noname": "t.pt"}
    model = builders.build_torch(*SMALL, seed=1)
    for name, original in misnamed.items():
        shutil.copy(tmp_path / original, tmp_path / name)
        weights.load(tmp_path / name, model)
        assert same_arrays(model, torch_weights), name


def test_port_help_names_both_file_formats(capsys):
    assert run_main(["port", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ".safetensors" in out and ".pt" in out


# ---------------------------------------------------------------------------------------------- 4
HALVES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def half_file(path: Path, state_dict: dict[str, torch.Tensor], dtype: str) -> Path:
    safetensors.torch.save_file({k: v.to(HALVES[dtype]) if v.is_floating_point() else v
                                 for k, v in state_dict.items()}, path)
    return path


@pytest.mark.parametrize("dtype", list(HALVES))
def test_half_precision_weights_load_cast_to_the_model_with_a_note(dtype, tmp_path, torch_weights):
    path = half_file(tmp_path / "w.safetensors", torch_weights, dtype)
    expected = {k: v.to(HALVES[dtype]).to(v.dtype) for k, v in torch_weights.items()}  # what the file holds
    for model in (builders.build_torch(*SMALL, seed=1), builders.build_flax_to_fill(*SMALL)):
        with pytest.warns(errors.Note, match=f"{dtype} weights: loaded cast to the model's float32"):
            weights.load(path, model)
        assert same_arrays(model, expected), type(model)


def test_verify_takes_bfloat16_weights(tmp_path, torch_weights, capsys):
    path = half_file(tmp_path / "w.safetensors", torch_weights, "bfloat16")
    code = run_main(["verify", "--weights", str(path), *MODEL, "--float64", *VERIFY_SMALL])
    captured = capsys.readouterr()
    assert code == 0, captured.out[-2000:] + captured.err[-2000:]
    assert "verifying SimpleResNet(n_blocks=1)" in captured.out and "bfloat16 weights" in captured.err


def test_train_torch_init_from_float16_weights(tmp_path, torch_weights, capsys):
    path = half_file(tmp_path / "w.safetensors", torch_weights, "float16")
    code = run_main(["train", "--framework", "torch", "--model", "SimpleResNet", "--n-blocks", "1", "--dataset",
                     "synthetic", "--train-samples", "16", "--test-samples", "8", "--batch-size", "8", "--epochs",
                     "1", "--no-progress", "--init-from", str(path), "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "float16 weights" in captured.err


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_to_torch_state_dict_of_a_half_precision_flax_model_keeps_its_dtype(dtype):
    model = cast_floating(builders.build_flax_to_fill(*SMALL), dtype)
    state_dict = port.to_torch_state_dict(model)
    arrays = port.to_numpy_state_dict(model)
    assert state_dict["fc.weight"].dtype == HALVES[dtype]
    for key, value in state_dict.items():
        assert np.array_equal(value.float().numpy(), np.asarray(arrays[key], np.float32)), key
    torch_twin = builders.build_torch(*SMALL).to(HALVES[dtype])
    torch_twin.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------------------------------- 5
@pytest.mark.parametrize(("command", "edit", "words"), [
    ("port", lambda sd: {**sd, "fc2.weight": torch.zeros(3)}, "1 key(s) more (fc2.weight)"),
    ("verify", lambda sd: {k: v for k, v in sd.items() if k != "fc.bias"}, "1 key(s) missing (fc.bias)"),
    ("port", lambda sd: {k: v for k, v in sd.items() if "num_batches_tracked" not in k},
     "key(s) missing (bn1.num_batches_tracked"),
])
def test_weights_no_model_fits_are_one_line_naming_the_nearest(command, edit, words, tmp_path, torch_weights,
                                                               capsys):
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(edit(dict(torch_weights)), path)
    argv = (["port", "--from", str(path), "--to", str(tmp_path / "out")] if command == "port" else
            ["verify", "--weights", str(path)])
    assert run_main(argv) == 1
    err = one_error(capsys.readouterr().err)
    assert str(path) in err and "--model" in err and "The nearest is SimpleResNet(n_blocks=1)" in err, err
    assert words in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("wrap", "note", "model"), [
    (lambda sd: {f"module.{k}": v for k, v in sd.items()}, "'module.' prefix", []),  # the model inferred
    (lambda sd: {"state_dict": sd, "epoch": 3}, "['state_dict'], leaving epoch", MODEL),
    (lambda sd: {"model": sd, "optimizer": {}, "epoch": 3}, "['model'], leaving epoch, optimizer", MODEL),
    (lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}, "'module.' prefix", MODEL),
])
def test_port_unwraps_the_usual_torch_wrappers_with_a_note(wrap, note, model, tmp_path, torch_weights, capsys):
    source, target = tmp_path / "w.pt", tmp_path / "back.pt"
    torch.save(wrap(dict(torch_weights)), source)
    assert run_main(["port", "--from", str(source), "--to", str(target), *model]) == 0
    assert note in " ".join(capsys.readouterr().err.split())
    back = torch.load(target, weights_only=True)
    assert list(back) == list(torch_weights) and all(torch.equal(back[k], v) for k, v in torch_weights.items())


# ---------------------------------------------------------------------------------------------- 7
def test_compare_a_model_without_parameters():
    x = np.random.default_rng(0).standard_normal((4, 10)).astype(np.float32)
    report = parity.compare(torch.nn.Identity(), layers.Identity(), x)
    assert report.ok and "no parameters" in report.table()


# ---------------------------------------------------------------------------------------------- 11
@pytest.mark.parametrize("target", ["w.safetensors", "ckpt"])
def test_port_into_a_read_only_place_says_so(target, tmp_path, torch_weights, monkeypatch, capsys):
    source = tmp_path / "w.pt"
    torch.save(torch_weights, source)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    os.chmod(read_only, 0o500)
    if os.access(read_only, os.W_OK):  # root: permission bits stop nothing; the OS's answer on a read-only mount
        def refuse(real):
            def call(path, *args, **kwargs):
                if str(path).startswith(str(read_only)):
                    raise OSError(30, os.strerror(30), str(path))  # EROFS
                return real(path, *args, **kwargs)
            return call

        monkeypatch.setattr(os, "mkdir", refuse(os.mkdir))
        monkeypatch.setattr(os, "open", refuse(os.open))
    try:
        code = run_main(["port", "--from", str(source), "--to", str(read_only / target), *MODEL])
    finally:
        monkeypatch.undo()
        os.chmod(read_only, 0o700)
    err = one_error(capsys.readouterr().err)
    assert code in (1, 2) and f"{read_only} is not writable" in err and "--resume" not in err, err
    assert err.rstrip().endswith("choose another --to."), err  # whole, not cut mid-word
    assert os.listdir(read_only) == []
