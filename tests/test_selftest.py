"""``train.py selftest`` (flax_resnet.selftest): one ``selftest --quick`` in a subprocess (as a user runs it, and
so that its exit code and its imports are its own: TFDS must never be imported), then checks of its JSON and
Markdown; a deliberately broken tolerance must fail it and name the model. About 2-3.5 minutes on 2 busy cores,
nearly all of it the quick run; no timing assertions."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flax_resnet import bench, cli, parity, registry, selftest

ROOT = Path(__file__).resolve().parent.parent
RUN = ("import sys\n"
       "from flax_resnet.cli import main\n"
       "code = main(['selftest', '--quick', '--out', sys.argv[1]])\n"
       "print('TFDS-IMPORTED' if 'tensorflow_datasets' in sys.modules else 'TFDS-NOT-IMPORTED', file=sys.stderr)\n"
       "sys.exit(code)\n")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``python train.py selftest --quick --out DIR`` in a fresh process: (process, JSON, Markdown)."""
    out = tmp_path_factory.mktemp("selftest")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", RUN, str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    return proc, json.loads((out / selftest.JSON_FILE).read_text()), (out / selftest.MARKDOWN_FILE).read_text()


def test_quick_selftest_passes_without_tfds(quick):
    proc, doc, _ = quick
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TFDS-NOT-IMPORTED" in proc.stderr
    assert doc["ok"] and doc["failed"] == [] and doc["mode"] == "quick"
    # progress lines with the elapsed time, one start and one end per part
    for part in selftest.PARTS:
        if part != "torch.compile":
            assert f"] {part}: start" in proc.stderr and f"] {part}: ok in " in proc.stderr


def test_json_has_every_part(quick):
    _, doc, _ = quick
    env = doc["environment"]
    for key in ("jax", "jaxlib", "flax", "optax", "torch", "python", "date", "device", "device_kind", "load_avg"):
        assert env[key], key
    assert env["cpu"]["model"] and {"avx2", "fma", "avx512", "text"} <= set(env["cpu"])
    assert set(doc["parts"]) == {"parity", "default-precision", "bench", "epochs"}
    assert all(part["status"] == "ok" and part["seconds"] > 0 for part in doc["parts"].values())

    rows = doc["parity"]
    parity_rows = {(r["model"], r["dtype"], r["precision"]) for r in rows if r["check"] == "parity"}
    for name, _ in selftest.QUICK.parity_models:
        assert {(name, "float64", "highest"), (name, "float32", "highest"), (name, "float32", "default")} \
            <= parity_rows
    assert {r["model"] for r in rows if r["check"] == "shapes"} == set(selftest.QUICK.shape_models)
    for r in rows:
        assert r["ok"] and r["counted"] == (r["precision"] != "default"), r
        if r["check"] == "parity":
            assert 0 <= r["outputs_rel_err"] <= r["tolerance"], r
    float64 = [r for r in rows if r["dtype"] == "float64"]
    assert all(r["gradients"] and r["gradients_rel_err"] <= r["gradient_tolerance"] for r in float64)

    assert set(doc["bench"]) == {"bf16", "fp32"}
    for precision, bench_rows in doc["bench"].items():
        assert {(r["impl"], r["phase"]) for r in bench_rows} == {(i, p) for i in bench.IMPLS for p in bench.PHASES}
        flax = [r for r in bench_rows if r["impl"] == "flax"]
        assert all(r["status"] == "ok" and r["precision"] == precision and r["images_per_s"] > 0 for r in flax)

    epochs = doc["epochs"]
    assert len(epochs["epoch_times_s"]) == 2 and epochs["precision"] == "bf16"
    assert 0 < epochs["epoch_s"] and math.isclose(epochs["estimate_s"],
                                                  epochs["first_epoch_s"] + 19 * epochs["epoch_s"])


def test_markdown_has_the_tables(quick):
    proc, _, md = quick
    assert md.startswith("# flax-resnet self-test (quick)") and "**PASS**" in md
    for heading in ("## Parity", "## Benchmark, bf16", "## Benchmark, fp32", "## Training", "## Time per part"):
        assert heading in md
    assert "| SimpleResNet(n_blocks=1) | parity | float64 | highest |" in md
    assert "CPU: " in md and "20 epochs (estimate)" in md
    assert md in proc.stdout  # the command prints the report


def test_a_failing_parity_row_fails_the_selftest_and_names_the_model(tmp_path, monkeypatch, capsys):
    """A zero float64 tolerance (any rounding difference fails) on one small model: exit code 1, and the report
    names the model and its first divergence. About 10 s."""
    monkeypatch.setattr(selftest, "QUICK", dataclasses.replace(selftest.QUICK, parity_models=(("SimpleNet", {}),),
                                                               shape_models=()))
    monkeypatch.setitem(parity.TOLERANCES, "float64", parity.Tolerance(0.0, 0.0, "broken on purpose"))
    code = cli.main(["selftest", "--quick", "--out", str(tmp_path), "--skip", "default-precision", "bench",
                     "epochs"])
    assert code == 1
    doc = json.loads((tmp_path / selftest.JSON_FILE).read_text())
    assert not doc["ok"] and any(f.startswith("SimpleNet() parity float64") for f in doc["failed"])
    failed = [r for r in doc["parity"] if not r["ok"]]
    assert [(r["model"], r["dtype"]) for r in failed] == [("SimpleNet", "float64")]
    assert "DIFFERENT" in failed[0]["report"]
    md = (tmp_path / selftest.MARKDOWN_FILE).read_text()
    assert "**FAIL**: SimpleNet() parity float64: first divergence" in md and "### SimpleNet() parity float64" in md
    assert "FAIL" in capsys.readouterr().err


def test_skipping_every_part_is_incomplete_not_a_pass(tmp_path, capsys):
    """Nothing run is not a pass: exit 1, and the report says INCOMPLETE."""
    assert cli.main(["selftest", "--quick", "--out", str(tmp_path), "--skip", *selftest.PARTS]) == 1
    out, err = capsys.readouterr()
    doc = json.loads((tmp_path / selftest.JSON_FILE).read_text())
    assert doc["verdict"] == "INCOMPLETE" and not doc["ok"]
    assert "**INCOMPLETE**: nothing ran" in (tmp_path / selftest.MARKDOWN_FILE).read_text() and "PASS" not in out
    assert err.splitlines()[-1].startswith("INCOMPLETE: nothing ran") and "PASS" not in err


def test_an_interrupted_selftest_says_incomplete_and_which_parts_did_not_run(tmp_path):
    """Ctrl-C during the bench (the child sends itself SIGINT there, so nothing is measured): the report written
    says INCOMPLETE, naming the bench (interrupted) and the epochs (not reached); exit 130."""
    code = ("import os, signal, sys\n"
            "from flax_resnet import selftest\n"
            "from flax_resnet.cli import main\n"
            "def bench(*args):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    signal.pause()\n"
            "selftest._bench_rows = bench\n"
            "sys.exit(main(['selftest', '--quick', '--out', sys.argv[1], '--skip', 'parity', 'default-precision']))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 130, proc.stderr[-3000:]
    doc = json.loads((tmp_path / selftest.JSON_FILE).read_text())
    assert doc["verdict"] == "INCOMPLETE" and doc["not_run"] == ["bench", "epochs"] and not doc["ok"]
    md = (tmp_path / selftest.MARKDOWN_FILE).read_text()
    assert "**INCOMPLETE**: not run: bench (interrupted), epochs" in md and "PASS" not in md
    assert "INCOMPLETE, not run: bench, epochs" in proc.stderr and "Traceback" not in proc.stderr


def test_skip_names_are_the_parts_and_checked():
    parser = cli.build_parser()
    args = parser.parse_args(["selftest", "--skip", *selftest.PARTS])
    assert tuple(args.skip) == selftest.PARTS
    with pytest.raises(SystemExit):
        parser.parse_args(["selftest", "--skip", "everything"])
    with pytest.raises(ValueError, match="unknown part"):
        selftest.run("unused", skip=["everything"])
    assert len(selftest.FULL.parity_models) == len(registry.MODELS)
