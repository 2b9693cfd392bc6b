"""The command line: help, argument checking before any side effect, real runs, porting, failing fast offline."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from cli_run import run_main

from flax_resnet import builders, cli, registry
from flax_resnet.data import cifar10

REPO = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    """A local TCP port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test touches the network: the CIFAR-10 source is a closed local port and urlopen fails loudly."""
    monkeypatch.setattr(cifar10, "SOURCE_HOST", "127.0.0.1")
    monkeypatch.setattr(cifar10, "SOURCE_PORT", closed_port())

    def no_urlopen(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_urlopen)



# ---------------------------------------------------------------------------------------------- help
def test_main_help_lists_the_commands(capsys):
    assert run_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "port" in out and "Without a command" in out


def test_train_help_explains_every_option_and_lists_recipes_and_models(capsys):
    assert run_main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    parser = cli.build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]  # noqa: SLF001
    flags = [s for a in train_parser._actions for s in a.option_strings if s.startswith("--")]  # noqa: SLF001
    assert len(flags) > 30
    for flag in flags:
        assert flag in out, flag
    words = " ".join(out.split())  # help text wraps anywhere
    for text in ("plain-vs-residual", "resnet18-cifar", "multistep [8, 12] x0.1", "0.0005", "0.0001",
                 "cosine (T_max = epochs)", "crop+flip", "0.4914", "(default: jax)", "(default: 0)",
                 "(default: float32)", "default: 3)"):
        assert text in words, text
    for name in registry.model_names():
        assert name in out


def test_port_help(capsys):
    assert run_main(["port", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--from" in out and "--to" in out and "--model" in out


# --------------------------------------------------------------------------------------- bad values
BAD = [
    ["--epochs", "0"],
    ["--batch-size", "0"],
    ["--eval-batch-size", "-1"],
    ["--lr", "0"],
    ["--lr", "-0.1"],
    ["--momentum", "1.0"],
    ["--weight-decay", "-1e-4"],
    ["--gamma", "0"],
    ["--milestones", "0", "5"],
    ["--std", "0.2", "0", "0.2"],
    ["--model", "ResNet19"],
    ["--recipe", "nope"],
    ["--model", "ResNet18", "--n-blocks", "2"],
    ["--model", "SimpleResNet", "--n-blocks", "0"],
    ["--model", "PlainNet", "--num-blocks", "1", "0", "1", "1"],
    ["--model", "ResNet18Dropout", "--dropout-p", "1.5"],
    ["--dataset", "mnist"],
    ["--dtype", "float16"],
    ["--train-samples", "0"],
    ["--max-to-keep", "0"],
    ["--seed", "-1"],
    ["--resume", "--overwrite"],
    ["--init-from", "/nonexistent/weights.pt"],
    ["--epochs", "two"],
    ["--framework", "torch", "--parallel", "pmap"],
    ["--bn-sync", "maybe"],
    ["--coordinator", "127.0.0.1:1234"],  # without --num-processes and --process-id
    ["--precision", "fp16"],
    ["--precision", "bf16", "--framework", "torch"],
    ["--precision", "bf16", "--dtype", "float64"],
]


@pytest.mark.parametrize("bad", BAD, ids=[" ".join(b) for b in BAD])
def test_impossible_values_exit_2_before_anything_is_written(bad, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(["train", "--dataset", "synthetic", "--out", str(out), *bad]) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists()


def test_options_without_a_command_are_trains(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(["--epochs", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--epochs" in err and ">= 1" in err and not out.exists()


@pytest.mark.parametrize("argv", [["--model", "SimpleNet", "verify"], ["train", "--model", "SimpleNet", "verify"]])
def test_a_command_after_options_is_named_in_the_order_that_works(argv, capsys):
    """Options before a command are train's, so ``--model X verify`` once said "unrecognized arguments: verify"."""
    assert run_main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "options follow the command" in err and "verify --model SimpleNet" in err, err


def test_version_prints_the_version(capsys):
    import flax_resnet

    assert run_main(["--version"]) == 0
    assert capsys.readouterr().out.split()[-1] == flax_resnet.__version__


def test_resume_of_an_out_without_checkpoints_says_it_starts_afresh(tmp_path, capsys):
    """A mistyped --out with --resume: one line saying so, then the run trains from scratch as asked."""
    out = tmp_path / "typo"
    assert run_main(["train", "--dataset", "synthetic", "--train-samples", "16", "--test-samples", "0", "--model",
                     "SimpleResNet", "--n-blocks", "1", "--image-size", "8", "--batch-size", "16", "--epochs", "1",
                     "--no-progress", "--resume", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "no checkpoint" in line]
    assert len(lines) == 1 and str(out) in lines[0] and "afresh" in lines[0], lines


def test_existing_checkpoints_need_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoints" / "1").mkdir(parents=True)
    assert run_main(["train", "--dataset", "synthetic", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--resume" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------- offline
def test_offline_default_run_fails_fast_with_the_fix(tmp_path, monkeypatch, capsys):
    """``python train.py`` with no data and no network: a one-paragraph message naming --archive, in seconds."""
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    code = run_main([])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 1
    assert elapsed < 15, elapsed
    assert err.startswith("error: ") and "does not answer" in err and "--archive" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_unreachable_coordinator_fails_within_the_timeout(tmp_path, capsys):
    """Multi-host flags reach jax.distributed: a coordinator nobody serves is a bounded wait and a clear error."""
    with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    start = time.perf_counter()
    code = run_main(["train", "--dataset", "synthetic", "--out", str(out), "--coordinator", f"127.0.0.1:{port}",
                     "--num-processes", "2", "--process-id", "1", "--distributed-timeout", "3"])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 1 and elapsed < 30, (code, elapsed)
    assert f"127.0.0.1:{port}" in err and "Traceback" not in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ real runs
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_train_subprocess_writes_history_curves_and_checkpoint(framework, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "train", "--dataset", "synthetic", "--train-samples", "32",
           "--test-samples", "8", "--model", "SimpleResNet", "--n-blocks", "1", "--epochs", "1", "--batch-size",
           "16", "--framework", framework, "--out", str(out), "--no-progress"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Epoch 1/1: Train Loss:" in proc.stdout
    history = json.loads((out / "history.json").read_text())
    assert set(history) >= {"train_loss", "train_acc", "test_loss", "test_acc", "epoch_time", "images_per_sec",
                            "lr"}
    assert all(len(v) == 1 for v in history.values())
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    from flax_resnet.store import CheckpointStore

    ckpt = CheckpointStore(out / "checkpoints")
    assert ckpt.steps == [1]
    assert ckpt.read_meta()["framework"] == framework  # both frameworks write the one store


def test_bf16_run_computes_in_bf16_and_records_it(tmp_path, monkeypatch, capsys):
    """``--precision bf16`` reaches the model (bf16 conv layers) and the checkpoint's meta (so --resume checks it)."""
    from flax_resnet import precision, weights

    seen = {}
    original = precision.apply_precision

    def spy(model, which):
        seen["which"] = which
        return original(model, which)

    monkeypatch.setattr(precision, "apply_precision", spy)
    out = tmp_path / "bf16"
    assert run_main(["train", "--dataset", "synthetic", "--train-samples", "32", "--test-samples", "8", "--model",
                     "SimpleResNet", "--n-blocks", "1", "--epochs", "1", "--batch-size", "16", "--precision", "bf16",
                     "--out", str(out), "--no-progress"]) == 0
    assert seen["which"] == "bf16"
    assert weights.read_meta(out)["precision"] == "bf16"
    # resuming with another precision is refused: the run's settings are part of its identity
    assert run_main(["train", "--dataset", "synthetic", "--train-samples", "32", "--test-samples", "8", "--model",
                     "SimpleResNet", "--n-blocks", "1", "--epochs", "2", "--batch-size", "16", "--out", str(out),
                     "--resume", "--no-progress"]) == 1
    assert "precision" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ port
def test_port_round_trip_pt_to_checkpoint_to_pt_is_bit_exact(tmp_path, capsys):
    torch.manual_seed(0)
    model = builders.build_torch("SimpleResNet", {"n_blocks": 1}, seed=0)
    model.train()
    with torch.no_grad():  # move the BatchNorm statistics and counters away from their initial values
        for _ in range(2):
            model(torch.randn(4, 3, 32, 32))
    original = model.state_dict()
    pt, ckpt, back = tmp_path / "w.pt", tmp_path / "ckpt", tmp_path / "back.pt"
    torch.save(original, pt)

    assert run_main(["port", "--from", str(pt), "--to", str(ckpt)]) == 0  # the model is recognised by its keys
    assert "SimpleResNet" in capsys.readouterr().out
    assert run_main(["port", "--from", str(ckpt), "--to", str(back)]) == 0  # the model is read from the checkpoint
    restored = torch.load(back, weights_only=True)
    assert list(restored) == list(original)
    for key, value in original.items():
        assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key
    model.load_state_dict(restored, strict=True)


def test_port_reports_weights_that_do_not_fit(tmp_path, capsys):
    pt = tmp_path / "w.pt"
    torch.save(builders.build_torch("PlainDeepCNN", {"n_blocks": 1}, seed=0).state_dict(), pt)
    code = run_main(["port", "--from", str(pt), "--to", str(tmp_path / "ckpt"), "--model", "SimpleResNet",
                     "--n-blocks", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "missing key" in err and "Traceback" not in err
    assert not (tmp_path / "ckpt").exists()


# -------------------------------------------------------------------------------------------- verify
VERIFY_SMALL = ["--batch", "2", "--image-size", "16"]  # 2 x 4 x 4 values per channel at the last BatchNorm


def test_verify_agrees_on_a_notebook_model_and_says_so(capsys):
    code = run_main(["verify", "--model", "SimpleResNet", "--n-blocks", "1", "--float64", *VERIFY_SMALL])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    assert "float64" in out and "stage3.0.conv2" in out and out.rstrip().splitlines()[-1].startswith("OK: all")


def test_verify_infers_the_model_from_weights_and_exits_1_at_the_wrong_layer(tmp_path, monkeypatch, capsys):
    """A .safetensors file names the model by its keys; a port that gets one layer wrong (here: fc's bias
    shifted after loading) exits 1 and names that layer."""
    from flax_resnet import port
    from flax_resnet.weights import save

    weights = tmp_path / "w.safetensors"
    save(builders.build_flax("SimpleResNet", {"n_blocks": 1}, seed=3), weights)
    loaded = port.load_torch_state_dict

    def wrong_port(model, state_dict):
        loaded(model, state_dict)
        model.fc.bias[...] = model.fc.bias[...] + 0.5

    monkeypatch.setattr(port, "load_torch_state_dict", wrong_port)
    code = run_main(["verify", "--weights", str(weights), *VERIFY_SMALL])
    out = capsys.readouterr().out
    assert code == 1, out[-2000:]
    assert "verifying SimpleResNet(n_blocks=1)" in out
    assert out.rstrip().splitlines()[-1].startswith("DIFFERENT:") and "first divergence: fc " in out


def test_verify_reads_a_flax_checkpoint_once_and_compares_its_weights(tmp_path, monkeypatch, capsys):
    """``verify --weights DIR`` with a Flax checkpoint (here ``port``'s): the model is the one the checkpoint
    records, its weights reach the torch model through the port (the weights block is all equal), and the
    arrays file is read and verified once."""
    from flax_resnet import weights
    from flax_resnet.store import CheckpointStore

    model = builders.build_flax("SimpleResNet", {"n_blocks": 1}, seed=5)
    weights.save(model, tmp_path / "ckpt", {"model": "SimpleResNet", "model_kwargs": {"n_blocks": 1}})
    reads = []
    read = CheckpointStore.read
    monkeypatch.setattr(CheckpointStore, "read", lambda self, step=None: reads.append(step) or read(self, step))
    code = run_main(["verify", "--weights", str(tmp_path / "ckpt"), "--float64", *VERIFY_SMALL])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    assert f"verifying SimpleResNet(n_blocks=1) with {tmp_path / 'ckpt'}" in out
    assert "weights (torch layout): all" in out
    assert len(reads) == 1


def test_verify_steps_trains_both_with_the_recipe_and_says_so(capsys):
    """``verify --steps 2``: notebook 000's recipe (SGD with coupled weight decay and momentum, MultiStepLR) in each
    framework as its trainer builds it; every comparison within the float64 tolerance, and the --help line."""
    code = run_main(["verify", "--model", "SimpleResNet", "--n-blocks", "1", "--steps", "2", *VERIFY_SMALL])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "recipe plain-vs-residual" in out and "MultiStepLR" in out and "momentum_buffer / trace" in out
    assert "float64, 2 steps" in out and out.rstrip().splitlines()[-1].startswith("OK: all")
    assert run_main(["verify", "--help"]) == 0
    words = " ".join(capsys.readouterr().out.split())
    assert "--steps K" in words and "always in float64" in words.lower() and "--steps-per-epoch N" in words


def test_verify_steps_exits_1_and_names_a_weight_decay_left_out(monkeypatch, capsys):
    """A Flax optimizer without the recipe's weight decay (planted in the trainer's own make_optimizer)."""
    import optax

    from flax_resnet.training import engine

    monkeypatch.setattr(engine, "make_optimizer", lambda recipe, steps_per_epoch: optax.sgd(recipe.lr, 0.9))
    code = run_main(["verify", "--model", "SimpleResNet", "--n-blocks", "1", "--steps", "2", *VERIFY_SMALL])
    out = capsys.readouterr().out
    assert code == 1, out[-3000:]
    assert "first divergence: step 1: conv1.weight" in out
    assert "\ndiagnosis:\n  " in out and "leaves out the weight decay of torch's SGD" in out


@pytest.mark.parametrize("argv, words", [
    (["verify"], ["--model", "--weights"]),
    (["verify", "--n-blocks", "2", "--weights", "w.pt"], ["--n-blocks", "--model"]),
    (["verify", "--model", "SimpleResNet", "--weights", "missing.pt"], ["--weights", "missing.pt"]),
    (["verify", "--model", "SimpleResNet", "--batch-size", "4"], ["--batch-size"]),  # verify's batch is --batch
])
def test_verify_usage_errors(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"")
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and all(word in err for word in words), err
