"""What a careless or hostile user tries, through the command line where they meet it: nothing is lost or mixed,
and every bad value gets one line naming the fix (exit 2 for usage, 1 for a run that cannot go on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import one_error, run_main

from flax_resnet import builders
from flax_resnet.store import CheckpointStore

REPO = Path(__file__).resolve().parent.parent
TINY = ["train", "--model", "SimpleResNet", "--n-blocks", "1", "--recipe", "resnet18-cifar", "--dataset", "synthetic",
        "--train-samples", "32",
        "--test-samples", "16", "--batch-size", "16", "--no-progress"]




@pytest.mark.parametrize(("option", "value"), [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"), ("--weight-decay", "nan"), ("--momentum", "1"),
    ("--gamma", "nan"), ("--std", "nan 1 1"), ("--mean", "1 inf 1"), ("--seed", "4294967296"),
    ("--seed", "99999999999999999999"), ("--distributed-timeout", "nan"),
])
def test_meaningless_numbers_are_refused_at_parse_time(option, value, tmp_path, capsys):
    code = run_main([*TINY, "--out", str(tmp_path / "out"), option, *value.split()])
    assert code == 2
    err = one_error(capsys.readouterr().err)
    assert option in err
    assert not (tmp_path / "out").exists()


def test_data_paths_that_cannot_be_meant_are_refused(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert run_main([*TINY, "--dataset", "cifar10", "--data-dir", str(a_file)]) == 2
    assert "is a file" in one_error(capsys.readouterr().err)
    assert run_main([*TINY, "--dataset", "cifar10", "--archive", str(tmp_path)]) == 2
    assert "is a directory; give the archive file" in one_error(capsys.readouterr().err)


def test_a_tilde_in_out_is_the_home_directory_for_every_output(tmp_path):
    """bash leaves ``--out=~/x`` unexpanded: checkpoints, history and curves must all go to $HOME/x, and a second
    run with another seed is refused before it trains."""
    env = {**os.environ, "HOME": str(tmp_path / "home"), "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, "--epochs", "1", "--out=~/x"]
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    out = tmp_path / "home" / "x"
    assert (out / "history.json").is_file() and (out / "curves.png").is_file()
    assert CheckpointStore(out / "checkpoints").steps == [1]
    assert not (tmp_path / "~").exists()
    second = subprocess.run([*cmd, "--seed", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 1 and "--resume" in one_error(second.stderr)
    assert "Epoch 1/1" not in second.stdout  # refused before training


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory) -> Path:
    """A finished 2-epoch JAX run (cosine schedule: the default recipe's) to resume against."""
    out = tmp_path_factory.mktemp("runs") / "jax"
    assert run_main([*TINY, "--epochs", "2", "--out", str(out)]) == 0
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("change", "named"), [
    (["--framework", "torch"], "framework: the checkpoint's run has 'jax', this one 'torch'"),
    (["--epochs", "4"], "--epochs: the checkpoint's run has 2, this one 4 (the cosine schedule's T_max"),
    (["--train-samples", "48"], "num_train: the checkpoint's run has 32, this one 48"),
])
def test_resume_refuses_another_run_naming_what_differs(change, named, two_epoch_run, tmp_path, capsys):
    """Another framework, a longer cosine run, other data: refused (exit 1), naming the field, nothing touched."""
    out = tmp_path / "run"
    subprocess.run(["cp", "-a", str(two_epoch_run), str(out)], check=True)
    (out / ".lock").unlink(missing_ok=True)
    before = snapshot(out)
    code = run_main([*TINY, "--epochs", "2", "--out", str(out), "--resume", *change])
    assert code == 1
    assert named in one_error(capsys.readouterr().err)
    assert snapshot(out) == before


def test_resume_refuses_a_run_on_other_data(tmp_path, capsys):
    """A synthetic run resumed on CIFAR-10 with the same counts (35 training, 5 test images: the tiny official-format
    archive the tests write): the data set is part of the run, so it is refused, named."""
    import cifar_archives as ca

    archive = ca.write_archive(tmp_path / "a.tar.gz", "binary", ca.random_batches())
    base = [*TINY[:11], "--test-samples", "5", "--batch-size", "16", "--no-progress", "--epochs", "1",
            "--out", str(tmp_path / "run")]
    base[base.index("--train-samples") + 1] = "35"
    assert run_main(base) == 0
    code = run_main([*base, "--resume", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--archive",
                     str(archive), "--skip-checksum", "--no-download"])
    assert code == 1
    assert "dataset: the checkpoint's run has 'synthetic', this one 'cifar10'" in one_error(capsys.readouterr().err)


def test_a_list_of_problems_keeps_its_lines_and_an_error_starts_its_own_line(two_epoch_run, tmp_path):
    """Several differing fields come as one line each (not one flattened paragraph); an error during an epoch
    comes after the progress bar is cleared, not glued to its end."""
    out = tmp_path / "run"
    subprocess.run(["cp", "-a", str(two_epoch_run), str(out)], check=True)
    (out / ".lock").unlink(missing_ok=True)
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, "--epochs", "2", "--out", str(out)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([*cmd, "--resume", "--seed", "5", "--framework", "torch"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert any(line.strip().startswith("seed: the checkpoint's run has 0, this one 5") for line in lines), lines
    assert any(line.strip().startswith("framework: the checkpoint's run has 'jax'") for line in lines), lines

    bar = [c for c in cmd if c != "--no-progress"]
    bar[bar.index(str(out))] = str(tmp_path / "diverged")
    proc = subprocess.run([*bar, "--lr", "1e30"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1 and "training diverged" in proc.stderr
    where = proc.stderr.index("error: ")
    assert where == 0 or proc.stderr[where - 1] in "\r\n", repr(proc.stderr[max(0, where - 80):where + 20])


def test_overwrite_removes_both_frameworks_checkpoints_and_nothing_else(two_epoch_run, tmp_path):
    out = tmp_path / "run"
    subprocess.run(["cp", "-a", str(two_epoch_run), str(out)], check=True)
    (out / ".lock").unlink(missing_ok=True)
    foreign = {"checkpoints/notes.txt": b"mine", "checkpoints/best/model.pt": b"also mine",
               "checkpoints/5/model.bin": b"not yours"}
    for name, data in foreign.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    assert run_main([*TINY, "--epochs", "1", "--framework", "torch", "--out", str(out), "--overwrite"]) == 0
    store = CheckpointStore(out / "checkpoints")
    assert store.steps == [1] and store.read_meta()["framework"] == "torch"  # the jax run's epochs 1-2 are gone
    for name, data in foreign.items():
        assert (out / name).read_bytes() == data


def test_overwrite_refuses_a_symlinked_checkpoint_directory(two_epoch_run, tmp_path, capsys):
    """checkpoints/ a link to another disk holding a run's checkpoints: --overwrite will not delete through the
    link (one error, the target untouched); with no checkpoints there, runs write through it as usual."""
    elsewhere = tmp_path / "elsewhere"
    subprocess.run(["cp", "-a", str(two_epoch_run / "checkpoints"), str(elsewhere)], check=True)
    (elsewhere / "precious").write_text("keep")
    before = snapshot(elsewhere)
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").symlink_to(elsewhere)
    assert run_main([*TINY, "--epochs", "1", "--out", str(out), "--overwrite"]) == 1
    assert "symbolic link" in one_error(capsys.readouterr().err)
    assert snapshot(elsewhere) == before


def test_no_test_set_writes_null_not_nan(tmp_path):
    out = tmp_path / "run"
    assert run_main([*TINY, "--epochs", "1", "--test-samples", "0", "--out", str(out)]) == 0
    text = (out / "history.json").read_text()
    history = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in history.json"))
    assert history["test_loss"] == [None] and history["test_acc"] == [None]


def test_init_from_a_checkpoint_of_another_model_names_it(two_epoch_run, tmp_path, capsys):
    code = run_main([*TINY[:4], "2", *TINY[5:], "--epochs", "1", "--out", str(tmp_path / "b"),
                     "--init-from", str(two_epoch_run)])
    assert code == 1
    err = one_error(capsys.readouterr().err)
    assert "holds weights of SimpleResNet(n_blocks=1), not of SimpleResNet(n_blocks=2)" in err
    assert "--model SimpleResNet --n-blocks 1" in err and len(err) < 400


def test_port_never_overwrites_silently_and_reports_a_failed_write(two_epoch_run, tmp_path, capsys, monkeypatch):
    precious = tmp_path / "precious.pt"
    precious.write_bytes(b"not to be lost")
    assert run_main(["port", "--from", str(two_epoch_run), "--to", str(precious)]) == 2
    assert "--overwrite" in one_error(capsys.readouterr().err)
    assert precious.read_bytes() == b"not to be lost"

    built = []
    real = builders.build_flax_to_fill
    monkeypatch.setattr(builders, "build_flax_to_fill", lambda *a, **k: built.append(a) or real(*a, **k))
    target = tmp_path / "ro" / "w.pt"
    target.parent.mkdir()
    os.chmod(target.parent, 0o500)
    try:
        if os.access(target.parent, os.W_OK):  # root: permission bits do not stop writes; a file in the way does
            os.chmod(target.parent, 0o700)
            (target.parent / f".{target.name}.tmp").mkdir()
        code = run_main(["port", "--from", str(two_epoch_run), "--to", str(target)])
        err = one_error(capsys.readouterr().err)
    finally:
        os.chmod(target.parent, 0o700)
    assert code == 1 and f"could not write {target}" in err
    assert not target.exists()
    assert built, "port builds the model without running its initialisers (builders.build_flax_to_fill)"
    assert run_main(["port", "--from", str(two_epoch_run), "--to", str(precious), "--overwrite"]) == 0
    assert precious.read_bytes()[:2] == b"PK"  # a torch zip file now


def test_a_batch_counter_beyond_int32_is_refused_not_wrapped():
    """torch's num_batches_tracked is int64; the Flax BatchNorm2d's is int32: 2**31 must not come back negative."""
    import torch

    from flax_resnet import port

    model = builders.build_flax_to_fill("SimpleResNet", {"n_blocks": 1})
    state_dict = builders.build_torch("SimpleResNet", {"n_blocks": 1}).state_dict()
    state_dict["bn1.num_batches_tracked"] = torch.tensor(2**31, dtype=torch.int64)
    with pytest.raises(port.PortError, match=r"bn1.num_batches_tracked = 2147483648 does not fit .* int32"):
        port.load_torch_state_dict(model, state_dict)
    state_dict["bn1.num_batches_tracked"] = torch.tensor(2**31 - 1, dtype=torch.int64)
    port.load_torch_state_dict(model, state_dict)
    assert int(port.to_torch_state_dict(model)["bn1.num_batches_tracked"]) == 2**31 - 1


def test_ctrl_c_during_compilation_exits_130_with_the_resume_hint(tmp_path):
    """Ctrl-C while XLA compiles (on its own threads) used to end in a segmentation fault at interpreter teardown.
    The child here interrupts itself while a compilation runs on another thread, as Ctrl-C during the first step
    does: it must exit 130 (not 139 or a signal), print the resume hint, and print no traceback."""
    code = (
        "import os, signal, sys, threading, time\n"
        "import jax, jax.numpy as jnp\n"
        "from flax_resnet import cli\n"
        "from flax_resnet.training import flax_backend\n"
        "def interrupted(self, *args, **kwargs):\n"
        "    big = lambda x: jax.lax.fori_loop(0, 200, lambda i, y: jnp.tanh(y @ y.T + i), x)\n"
        "    threading.Thread(target=lambda: jax.jit(big).lower(jnp.ones((256, 256))).compile(), daemon=True).start()\n"
        "    time.sleep(0.2)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(30)\n"
        "flax_backend.FlaxBackend.train_epoch = interrupted\n"
        f"sys.exit(cli.main({[*TINY, '--epochs', '1', '--out', str(tmp_path / 'out')]!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-2000:])
    assert "interrupted; continue with the same command and --resume" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cifar10_messages_name_the_flag_and_a_prepared_dir_refuses_another_archive(tmp_path, capsys):
    """The md5 error names --skip-checksum (not a Python keyword); preparing prints nothing of TFDS's
    "Downloading and preparing"; another --archive given for already prepared data is refused, naming the data."""
    import cifar_archives as ca

    archive = ca.write_archive(tmp_path / "a.tar.gz", "python", ca.random_batches())
    cifar = ["train", "--model", "SimpleResNet", "--n-blocks", "1", "--epochs", "1", "--no-progress", "--no-download",
             "--data-dir", str(tmp_path / "data"), "--archive", str(archive), "--out", str(tmp_path / "out"),
             "--batch-size", "8"]
    assert run_main(cifar) == 1
    err = one_error(capsys.readouterr().err)
    assert "--skip-checksum" in err and "skip_checksum=True" in err
    assert run_main([*cifar, "--skip-checksum"]) == 0
    out, err = capsys.readouterr()
    assert "Downloading and preparing" not in out + err
    other = tmp_path / "other.tar.gz"
    other.write_bytes(b"not the archive the data was prepared from")
    cifar[cifar.index(str(archive))] = str(other)
    assert run_main([*cifar, "--skip-checksum", "--overwrite"]) == 1  # not trained on the old data unsaid
    err = one_error(capsys.readouterr().err)
    assert f"already prepared in {tmp_path / 'data' / 'cifar10'} from another archive than --archive {other}" in err
    assert f"Remove {tmp_path / 'data' / 'cifar10'}" in err


def test_no_progress_shows_nothing_of_tfds_while_cifar10_is_prepared_and_read(tmp_path):
    """TFDS's progress bars and absl's "OpenCV is not installed" went to stderr under --no-progress (a fresh
    process: absl says it once per process)."""
    import cifar_archives as ca

    archive = ca.write_archive(tmp_path / "a.tar.gz", "binary", ca.random_batches(per_batch=4, num_test=4))
    cmd = [sys.executable, "train.py", "train", "--model", "SimpleResNet", "--n-blocks", "1", "--epochs", "1",
           "--batch-size", "8", "--no-progress", "--no-download", "--data-dir", str(tmp_path / "data"), "--archive",
           str(archive), "--skip-checksum", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OpenCV" not in proc.stderr and "it/s" not in proc.stderr and "examples/s" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv", [
    ["landscape", "--quick", "--radius", "nan"], ["landscape", "--quick", "--radius", "-1"],
    ["plain-vs-residual", "--quick", "--lr", "inf"], ["ablation", "--quick", "--dropout-p", "1.5"],
    ["depth", "--quick", "--seed", "-3"],
])
def test_experiment_numbers_are_checked_at_parse_time(argv, tmp_path, capsys):
    assert run_main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert argv[2] in one_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_bench_json_to_a_directory_fails_before_the_run(tmp_path, capsys):
    assert run_main(["bench", "--quick", "--json", str(tmp_path)]) == 2
    err = one_error(capsys.readouterr().err)
    assert "--json" in err and str(tmp_path) in err


def test_landscape_names_swapped_runs(two_epoch_run, tmp_path, capsys):
    """--plain given a residual network's run: the checkpoint names its model, so that is said, not plotted."""
    code = run_main(["landscape", "--no-progress", "--dataset", "synthetic", "--train-samples", "32",
                     "--test-samples", "16", "--plain", str(two_epoch_run), "--residual", str(two_epoch_run),
                     "--out", str(tmp_path / "ls")])
    assert code == 1
    err = one_error(capsys.readouterr().err)
    assert "holds a SimpleResNet, which is not a plain network; swap --plain and --residual" in err


def test_process_0_whose_peer_never_comes_gets_the_named_error(tmp_path):
    """Process 0 of a 2-process run, alone: after --distributed-timeout seconds one named error and exit 1, not
    JAX's C++ abort (exit 134, a stack trace) that follows when its own timeout runs out."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, "--epochs", "1", "--out", str(tmp_path / "out"),
           "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0",
           "--distributed-timeout", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    err = one_error(proc.stderr)
    assert "process 0 waited 3 s" in err and "not all 2 processes joined" in err


@pytest.mark.parametrize("argv", [
    ["verify", "--model", "SimpleNet", "--image-size", "16"],
    [*TINY[:2], "SimpleNet", *TINY[5:], "--image-size", "16"],
    [*TINY[:2], "SimpleNet", *TINY[5:], "--image-size", "16", "--framework", "torch"],
])
def test_simplenet_is_said_to_take_32x32_only(argv, tmp_path, capsys):
    """SimpleNet's fc layer is sized for 32x32 inputs: one line before anything runs, not torch's matmul error."""
    out = tmp_path / "out"
    assert run_main([*argv, *(["--out", str(out)] if argv[0] == "train" else [])]) == 2
    err = one_error(capsys.readouterr().err)
    assert "SimpleNet takes 32x32 images only" in err and "--image-size 16" in err
    assert not out.exists()


def test_simplenet_weights_named_by_the_file_are_checked_too(tmp_path, capsys):
    from flax_resnet import weights

    path = tmp_path / "simplenet.safetensors"
    weights.save(builders.build_torch("SimpleNet", {}, seed=0), path)
    assert run_main(["verify", "--weights", str(path), "--image-size", "16"]) == 2
    assert "SimpleNet takes 32x32 images only" in one_error(capsys.readouterr().err)


def test_a_run_config_refuses_what_the_model_cannot_take():
    from flax_resnet.config import ConfigError, DataConfig, ModelConfig, RunConfig
    from flax_resnet.recipes import RECIPES

    with pytest.raises(ConfigError, match="SimpleNet takes 32x32"):
        RunConfig(RECIPES["resnet18-cifar"], model=ModelConfig("SimpleNet"),
                  data=DataConfig("synthetic", image_size=16))
    with pytest.raises(ConfigError, match="--image-size.*64"):
        DataConfig("synthetic", image_size=10000)


@pytest.mark.parametrize(("argv", "named"), [
    (["--image-size", "10000"], "--image-size"),  # ran out of memory after 24 s
    (["--image-size", "65"], "--image-size"),
    (["--batch", "64"], "--batch 64 of 32x32 images"),
    (["--batch", "5", "--image-size", "64"], "--batch 5 of 64x64 images"),
])
def test_verify_bounds_its_batch_by_memory_with_the_reason(argv, named, capsys):
    assert run_main(["verify", "--model", "ResNet18", *argv]) == 2
    err = one_error(capsys.readouterr().err)
    assert named in err and "memory" in err, err
