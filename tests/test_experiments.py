"""The experiments end to end: every quick run in-process through ``<module>.run(config, settings)`` with typed
values, its files and the values in them; ``Context.train``'s one way to a run (``training.train(config)``); the
command line's parsers, usage errors and --out claim.

Quick runs train on synthetic data with the smallest models, so the suite stays within a few minutes on two
CPU cores. ``plain-vs-residual``'s runs are shared: ``landscape`` reads their checkpoints, as a user would.
"""

from __future__ import annotations

import json
import math
import os
import urllib.request
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from cli_run import run_main
from flax import nnx

from flax_resnet import builders, port, tables, training, weights
from flax_resnet.cli import experiments as experiments_cli
from flax_resnet.config import ConfigError, ModelConfig, ParallelConfig, Preset, RunConfig
from flax_resnet.experiments import (
    EXPERIMENTS,
    ablation,
    common,
    compare,
    depth,
    init_variance,
    landscape,
    plain_vs_residual,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an experiment test tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)



def quick_config(module: Any, out: Path, *, recipe: dict | None = None, data: dict | None = None,
                 **fields: Any) -> RunConfig:
    """The experiment's --quick config writing to ``out``, with ``recipe`` / ``data`` values and fields over it."""
    output = {"out_dir": out, "progress": False, **fields.pop("output", {})}
    return common.configure(module.BASE, module.QUICK, recipe=recipe, data=data, output=output, **fields)


def quick(module: Any, out: Path, *, recipe: dict | None = None, data: dict | None = None,
          **settings: Any) -> dict:
    """Run ``module`` with its quick preset (``settings`` over the preset's) into ``out``; check the files every
    experiment writes; return results.json."""
    config = quick_config(module, out, recipe=recipe, data=data)
    settings = module.Settings(**{**module.QUICK.settings, **settings})
    outcome = module.run(config, settings)
    assert outcome.out == out
    results = json.loads((out / common.RESULTS_FILE).read_text())
    assert results["command"] == module.NAME
    # "settings": the typed config and the experiment's own settings, as given
    assert results["settings"] == json.loads(json.dumps(common.settings_json(config, settings)))
    assert results["figures"], "no figure"
    for name in results["figures"]:
        data_ = (out / name).read_bytes()
        assert data_.startswith(PNG_MAGIC) and len(data_) > 5_000, name
    summary = (out / common.SUMMARY_FILE).read_text()
    assert summary == outcome.summary
    table = [line for line in summary.splitlines() if line.startswith("|")]
    assert len(table) >= 3 and set(table[1]) <= set("|-: "), summary  # header, rule, rows
    return results


def param_count(name: str, kwargs: dict) -> int:
    model = nnx.eval_shape(lambda: builders.build_flax(name, kwargs))
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def assert_accuracies(history: dict) -> None:
    for key in ("train_acc", "test_acc"):
        assert history[key], key
        assert all(v is not None and 0.0 <= v <= 100.0 for v in history[key]), (key, history[key])


# ------------------------------------------------------------------------------------- plain vs residual
@pytest.fixture(scope="module")
def pvr(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("plain-vs-residual")
    return out, quick(plain_vs_residual, out)


def test_plain_vs_residual_quick(pvr, capsys):
    out, results = pvr
    n = results["n_blocks"]
    assert n == 1 and results["settings"]["experiment"] == {"n_blocks": 1}
    for key, model in (("plain", "PlainDeepCNN"), ("resnet", "SimpleResNet")):
        run = results["runs"][key]
        assert run["model"] == model
        assert run["conv_layers"] == 1 + 6 * n
        assert run["params"] == param_count(model, {"n_blocks": n})
        assert_accuracies(run["history"])
        assert len(run["history"]["train_loss"]) == results["recipe"]["epochs"] == 4
        assert (out / "runs" / model / "checkpoints").is_dir()
    # the notebook's milestones [8, 12] of 15 epochs, scaled to the 4-epoch run
    assert results["recipe"]["milestones"] == [2, 3]
    summary = (out / "summary.md").read_text()
    assert "| Conv layers" in summary and "ResNet advantage" in summary
    assert f"{results['runs']['plain']['params']:,}" in summary
    final = {key: run["history"]["test_acc"][-1] for key, run in results["runs"].items()}
    assert results["resnet_advantage_test_acc"] == pytest.approx(final["resnet"] - final["plain"])


def test_parameter_counts_match_torch():
    for name, kwargs in (("PlainDeepCNN", {"n_blocks": 1}), ("SimpleResNet", {"n_blocks": 1})):
        flax_model = builders.build_flax(name, kwargs, seed=0)
        torch_model = builders.build_torch(name, kwargs, seed=0)
        assert common.count_params(flax_model) == common.count_params(torch_model) == param_count(name, kwargs)
        assert common.count_conv_layers(flax_model) == common.count_conv_layers(torch_model) == 7


# ------------------------------------------------------------------------------------------- landscape
def test_landscape_of_the_experiment_checkpoints(pvr, tmp_path):
    runs = pvr[0] / "runs"
    results = quick(landscape, tmp_path / "landscape", plain=runs / "PlainDeepCNN", residual=runs / "SimpleResNet")
    alphas = results["alphas"]
    assert len(alphas) == 21 and alphas[0] == -1 and alphas[-1] == 1
    assert results["relative"] is True and results["splits"] == ["test", "train"]
    assert set(results["networks"]) == {"plain", "residual"}
    for label, net in results["networks"].items():
        assert net["model"] == ("PlainDeepCNN" if label == "plain" else "SimpleResNet")
        assert net["conv_layers"] == 7 and net["epoch"] == 4
        for split, curve in net["splits"].items():
            losses = curve["losses"]
            assert all(v is not None and math.isfinite(v) for v in losses), (label, split)
            # a trained network sits at the bottom of its basin
            assert abs(curve["argmin_alpha"]) <= 0.2, (label, split, curve["argmin_alpha"])
            assert curve["mean_rise_at_ends"] > 0
            assert curve["loss_at_0"] == pytest.approx(losses[10])


def test_landscape_quick_trains_its_own_networks(tmp_path):
    out = tmp_path / "landscape"
    results = quick(landscape, out, recipe={"epochs": 1}, data={"train_samples": 64, "test_samples": 16}, points=5,
                    splits=("test",))
    assert set(results["networks"]) == {"plain", "residual"}
    for model in ("PlainDeepCNN", "SimpleResNet"):
        assert (out / "runs" / model / "checkpoints").is_dir()
    for net in results["networks"].values():
        assert len(net["splits"]["test"]["losses"]) == 5
        assert all(math.isfinite(v) for v in net["splits"]["test"]["losses"])


def test_landscape_loss_ignores_batchnorm_statistics_and_leaves_the_model_alone():
    from flax_resnet.experiments.landscape import line_loss

    model = builders.build_flax("SimpleResNet", {"n_blocks": 1}, seed=0)
    before = jax.tree.map(np.asarray, nnx.state(model))
    x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    y = jax.numpy.arange(8) % 10
    losses = line_loss(model)(x, y, [-1.0, 0.0, 1.0])
    after = jax.tree.map(np.asarray, nnx.state(model))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))
    model.eval()
    from flax_resnet.training.engine import cross_entropy

    assert losses[1] == pytest.approx(float(cross_entropy(model(x), y)), rel=1e-5)


# ------------------------------------------------------------------------------------------------- depth
def test_depth_quick(tmp_path):
    results = quick(depth, tmp_path / "depth")
    plain, resnet = results["runs"]["PlainNet"], results["runs"]["SimpleResNet"]
    assert [r["conv_layers"] for r in plain] == [9, 17]  # 1 + 2 * sum(num_blocks)
    assert [r["conv_layers"] for r in resnet] == [7, 13]  # 1 + 6n
    for run in plain + resnet:
        assert run["params"] == param_count(run["model"], run["model_kwargs"])
        assert_accuracies(run["history"])
    assert set(results["deep_minus_shallow_train_acc"]) == {"PlainNet", "SimpleResNet"}


# ----------------------------------------------------------------------------------------------- he-init
def test_he_init_quick(tmp_path):
    results = quick(init_variance, tmp_path / "he-init")
    simple, resnet = results["models"]["SimpleNet"], results["models"]["ResNet18"]
    assert simple["layers"] == ["conv1", "conv2", "conv3", "conv4", "fc"]
    assert len(resnet["layers"]) == 21 and resnet["layers"][-1] == "fc"
    for model in (simple, resnet):
        assert set(model["variances"]) == {"torch/he", "flax/he", "torch/default", "flax/default", "flax/stock"}
        for values in model["variances"].values():
            assert len(values) == len(model["layers"]) and all(v > 0 for v in values)
    for framework in ("torch", "flax"):
        he, default = simple["gains"][f"{framework}/he"], simple["variances"][f"{framework}/default"]
        # He: each layer keeps the variance of the one before it within a factor of 4
        assert all(0.25 <= g <= 4 for g in he[1:]), he
        # torch's default init: the variance fades by ~6x per ReLU layer
        assert all(g < 0.25 for g in simple["gains"][f"{framework}/default"][1:])
        assert default[-1] < 1e-2 * default[0]
    # the two frameworks draw different weights from the same distributions: same variances up to noise
    for init in ("he", "default"):
        for t, f in zip(simple["variances"][f"torch/{init}"], simple["variances"][f"flax/{init}"], strict=True):
            assert 0.4 < f / t < 2.5, (init, t, f)


# ---------------------------------------------------------------------------------------------- ablation
def test_ablation_quick(tmp_path):
    results = quick(ablation, tmp_path / "ablation")
    assert set(results["results"]) == {"with_bn", "without_bn", "with_dropout"}
    for key, accuracy in results["results"].items():
        assert accuracy is not None and 0.0 <= accuracy <= 100.0, key
        assert_accuracies(results["runs"][key]["history"])
    params = {key: run["params"] for key, run in results["runs"].items()}
    assert params["with_bn"] == params["with_dropout"] == param_count("ResNet18", {})
    assert params["without_bn"] < params["with_bn"]


# ----------------------------------------------------------------------------------------------- compare
def test_compare_quick(tmp_path):
    results = quick(compare, tmp_path / "compare")
    jax_run, torch_run = results["runs"]["jax"], results["runs"]["torch"]
    assert jax_run["params"] == torch_run["params"]
    for run in (jax_run, torch_run):
        assert_accuracies(run["history"])
        assert all(v > 0 for v in run["history"]["images_per_sec"])
    # same initial weights, same batches: the two trainings agree to float32 rounding
    assert results["max_train_loss_difference"] < 1e-2
    assert abs(results["test_acc_difference"]) <= 100.0 / 64 * 2  # at most two of 64 test images
    for timing in results["timing"].values():
        assert timing["images_per_sec_median"] > 0 and timing["first_epoch_time"] > 0

    # the float32 yardstick: each framework also in float64, from the same weights on the same batches
    out = tmp_path / "compare"
    assert set(results["runs"]) == {"jax", "torch", "jax-float64", "torch-float64"}
    assert results["yardstick"]["status"] == "measured"
    histories = {name: training.read_history(out / "runs" / name) for name in results["runs"]}
    for name, run in results["runs"].items():  # the runs' own history.json files, as trained
        assert run["history"]["train_loss"] == histories[name]["train_loss"], name
        meta = weights.read_meta(out / "runs" / name)  # what the run's checkpoints record it trained as
        assert (meta["framework"], meta["dtype"]) == (name.partition("-")[0], name.partition("-")[2] or "float32")
    summary = (out / common.SUMMARY_FILE).read_text()
    assert set(results["gaps"]) == {"jax vs jax-float64", "torch vs torch-float64", "jax vs torch",
                                    "jax-float64 vs torch-float64"}
    for key, gap in results["gaps"].items():  # each gap recomputed from the two runs' history.json
        a, b = (histories[name] for name in gap["runs"])
        loss = max(abs(x - y) for x, y in zip(a["train_loss"], b["train_loss"], strict=True))
        assert gap["max_train_loss_difference"] == pytest.approx(loss, rel=1e-12, abs=0), key
        assert gap["test_acc_difference"] == pytest.approx(a["test_acc"][-1] - b["test_acc"][-1], abs=1e-12), key
        row = next(line for line in summary.splitlines()  # the second table's row of this pair
                   if line.startswith("|") and f"{gap['max_train_loss_difference']:.2e}" in line
                   and gap["measures"] in line)
        assert f"{gap['test_acc_difference']:+.2f} points" in row, row
    assert results["max_train_loss_difference"] == results["gaps"]["jax vs torch"]["max_train_loss_difference"]
    # float64: the two frameworks agree far closer than either float32 run to its own float64 run; bound 1e-6:
    # float64 rounding (1e-16) amplified by two epochs of training stays many orders below float32's 1e-4 here
    assert results["gaps"]["jax-float64 vs torch-float64"]["max_train_loss_difference"] < 1e-6
    assert "What rounding alone does" in summary and "float32-vs-float64 gap" in summary
    cross = results["gaps"]["jax vs torch"]["max_train_loss_difference"]
    assert f"float32 ({cross:.2e})" in summary


# ----------------------------------------------------------------------------- the typed seam, one way to train
class FakeTrain:
    """``training.train`` recording the configs it is given, returning a two-epoch history at once."""

    def __init__(self) -> None:
        self.calls: list[tuple[RunConfig, dict]] = []

    def __call__(self, config: RunConfig, **kwargs: Any) -> training.TrainResult:
        self.calls.append((config, kwargs))
        model = kwargs.get("model")
        model = model if model is not None else builders.build_flax(config.model.name, config.model.kwargs)
        history = {k: [1.0, 2.0] for k in training.HISTORY_KEYS}
        return training.TrainResult(model, history)


def test_context_train_hands_the_experiment_config_to_train(tmp_path, monkeypatch):
    """Context.train is `train`'s one way in: the experiment's config (seed, dtype, precision, devices, resume) as
    given, with the run's model, recipe and OUT/runs/<name>; the devices options hold for Flax runs only."""
    fake = FakeTrain()
    monkeypatch.setattr(training, "train", fake)
    base = quick_config(plain_vs_residual, tmp_path, seed=3, precision="bf16",
                        parallel=ParallelConfig(kind="single", bn_sync=False), output={"resume": True})
    dataset = object()
    ctx = common.Context(base, tmp_path, dataset=dataset, log=lambda line: None)
    run = ctx.train("Plain", "PlainDeepCNN", {"n_blocks": 1}, "PlainDeepCNN")
    (config, kwargs), = fake.calls
    assert config == base.replace(model=ModelConfig("PlainDeepCNN", {"n_blocks": 1}),
                                  output={"out_dir": tmp_path / "runs" / "PlainDeepCNN"})
    assert kwargs["dataset"] is dataset and "PlainDeepCNN(n_blocks=1)" in kwargs["title"]
    assert run.out_dir == tmp_path / "runs" / "PlainDeepCNN" and run.conv_layers == 7 and run.train_time == 3.0
    assert run.params == param_count("PlainDeepCNN", {"n_blocks": 1})

    ctx = common.Context(base.replace(precision="fp32"), tmp_path)
    ctx.train("t", "SimpleResNet", {"n_blocks": 1}, "t", framework="torch", overwrite=True)
    config = fake.calls[-1][0]
    assert config.framework == "torch" and config.parallel == ParallelConfig()
    assert config.output.overwrite and not config.output.resume


def test_compare_starts_both_frameworks_from_one_state_dict(tmp_path, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(training, "train", fake)
    config = quick_config(compare, tmp_path, seed=5)
    assert config.model == ModelConfig("SimpleResNet", {"n_blocks": 1})
    compare.run_compare(common.Context(config, tmp_path))
    # float32 (the default): both frameworks, then each again in float64 (the yardstick), from the same weights
    assert [(c.framework, c.dtype, c.output.out_dir.name) for c, _ in fake.calls] == [
        ("jax", "float32", "jax"), ("torch", "float32", "torch"),
        ("jax", "float64", "jax-float64"), ("torch", "float64", "torch-float64")]
    expected = compare.torch_initial_weights("SimpleResNet", {"n_blocks": 1}, 5)
    for config_, kwargs in fake.calls:
        start = config_.model.init_from  # the state_dict, or (until weights reads mappings) a model holding it
        if start is None:
            model = kwargs["model"]
            start = port.to_torch_state_dict(model) if config_.framework == "jax" else model.state_dict()
        assert start.keys() == expected.keys(), config_.framework
        assert all(np.array_equal(np.asarray(start[k]), expected[k].numpy()) for k in start), config_.framework
    # --init-from: all start from the weights given instead
    weights_file = tmp_path / "w.safetensors"
    compare.run_compare(common.Context(config.replace(model={"init_from": weights_file}), tmp_path))
    assert [c.model.init_from for c, _ in fake.calls[4:]] == [weights_file] * 4


class GapTrain(FakeTrain):
    """``FakeTrain`` whose training losses are given per (framework, dtype): gaps of known sizes."""

    def __init__(self, losses: dict[tuple[str, str], list[float]]) -> None:
        super().__init__()
        self.losses = losses

    def __call__(self, config: RunConfig, **kwargs: Any) -> training.TrainResult:
        result = super().__call__(config, **kwargs)
        result.history["train_loss"] = list(self.losses[config.framework, config.dtype])
        return result


@pytest.mark.parametrize(("losses", "words"), [
    # float32 Flax vs torch 0.2 apart; each 0.1 from its own float64 run: within the two together
    ({("jax", "float32"): [1.0, 1.5], ("torch", "float32"): [1.0, 1.7], ("jax", "float64"): [1.0, 1.6],
      ("torch", "float64"): [1.0, 1.6]},
     "gap in float32 (2.00e-01) is larger than each framework's own float32-vs-float64 gap and within their sum "
     "(1.00e-01 in Flax, 1.00e-01 in torch); in float64 the two frameworks' training losses are identical."),
    # float32 0.01 apart, rounding moves each by 0.3 and 0.5: the frameworks' gap is the smaller
    ({("jax", "float32"): [1.0, 1.3], ("torch", "float32"): [1.0, 1.31], ("jax", "float64"): [1.0, 1.0],
      ("torch", "float64"): [1.0, 1.81]},
     "gap in float32 (1.00e-02) is smaller than each framework's own float32-vs-float64 gap (3.00e-01 in Flax, "
     "5.00e-01 in torch); in float64 the two frameworks' training losses are 8.10e-01 apart, no closer than in "
     "float32."),
    # a gap between the two yardsticks, float64 5 times closer; the largest gaps in the first epoch, not the last
    ({("jax", "float32"): [1.3, 1.2], ("torch", "float32"): [1.2, 1.25], ("jax", "float64"): [1.3, 1.15],
      ("torch", "float64"): [1.32, 1.15001]},
     "gap in float32 (1.00e-01) is between the two frameworks' own float32-vs-float64 gaps (5.00e-02 in Flax, "
     "1.20e-01 in torch); in float64 the two frameworks' training losses are 2.00e-02 apart, 5.0e+00 times less "
     "than in float32."),
    # the float64 runs themselves 0.2 apart: a float32 gap beyond what rounding in each makes
    ({("jax", "float32"): [1.0, 1.2], ("torch", "float32"): [1.0, 1.5], ("jax", "float64"): [1.0, 1.25],
      ("torch", "float64"): [1.0, 1.45]},
     "gap in float32 (3.00e-01) is larger than each framework's own float32-vs-float64 gap and than their sum "
     "(5.00e-02 in Flax, 5.00e-02 in torch); in float64 the two frameworks' training losses are 2.00e-01 apart, "
     "1.5e+00 times less than in float32."),
])
def test_compare_words_the_float32_gap_by_the_measured_yardstick(losses, words, tmp_path, monkeypatch):
    """summary.md reads the Flax-vs-torch gap against each framework's float32-vs-float64 gap by the numbers."""
    monkeypatch.setattr(training, "train", GapTrain(losses))
    config = quick_config(compare, tmp_path, data={"train_samples": 8, "test_samples": 8})
    summary = compare.run(config, compare.Settings()).summary
    assert words in " ".join(summary.split()), summary


@pytest.mark.parametrize(("argv", "status", "words"), [
    (["--dtype", "float64"], "skipped", "no yardstick in float64: the gap above is the parity statement"),
    (["--no-yardstick"], "off", "no float64 yardstick (--no-yardstick)"),
])
def test_compare_without_the_yardstick_trains_two_runs_and_says_why(argv, status, words, tmp_path, monkeypatch,
                                                                      capsys):
    """In float64 compare trains no yardstick (the gap is the parity statement); --no-yardstick turns it off in
    float32. Either way two runs, in the dtype asked, and summary.md says why there is no yardstick."""
    fake = FakeTrain()
    monkeypatch.setattr(training, "train", fake)
    out = tmp_path / "compare"
    assert run_main(["compare", "--quick", "--train-samples", "8", "--test-samples", "8", "--no-progress",
                     "--out", str(out), *argv]) == 0
    dtype = "float64" if "float64" in argv else "float32"
    assert [(c.framework, c.dtype) for c, _ in fake.calls] == [("jax", dtype), ("torch", dtype)]
    results = json.loads((out / common.RESULTS_FILE).read_text())
    assert set(results["runs"]) == {"jax", "torch"} and set(results["gaps"]) == {"jax vs torch"}
    assert results["yardstick"]["status"] == status and words in results["yardstick"]["note"]
    assert results["settings"]["experiment"] == {"yardstick": "--no-yardstick" not in argv}
    summary = (out / common.SUMMARY_FILE).read_text()
    assert words in " ".join(summary.split()) and "What rounding alone does" not in summary


@pytest.mark.parametrize(("module", "changes", "words"), [
    (plain_vs_residual, {"model": ModelConfig(init_from=Path("w.pt"))}, "--init-from"),
    (depth, {"model": ModelConfig(init_from=Path("w.pt"))}, "--init-from"),
    (ablation, {"model": ModelConfig(init_from=Path("w.pt"))}, "--init-from"),
    (landscape, {"model": ModelConfig(init_from=Path("w.pt"))}, "--init-from"),
    (compare, {"precision": "bf16"}, "--precision"),
    (init_variance, {"framework": "torch"}, "--framework"),
    (init_variance, {"dtype": "float64"}, "--dtype"),
    (init_variance, {"parallel": ParallelConfig(kind="single")}, "--parallel"),
    (plain_vs_residual, {"parallel": ParallelConfig(coordinator="h:1", num_processes=2, process_id=0)},
     "multi-host"),
])
def test_an_experiment_refuses_what_it_cannot_honour_in_one_line(module, changes, words, tmp_path):
    """An option of `train` that an experiment cannot honour is refused before anything is written, not ignored."""
    config = quick_config(module, tmp_path / "out").replace(**changes)
    with pytest.raises(ConfigError, match=words) as e:
        module.run(config, module.Settings(**module.QUICK.settings))
    assert module.NAME in str(e.value) and str(e.value).count(". ") <= 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("make", "words"), [
    (lambda: depth.Settings(plain_blocks=((1, 1, 1),)), "--plain-blocks"),
    (lambda: depth.Settings(resnet_blocks=(0,)), "--resnet-blocks"),
    (lambda: ablation.Settings(dropout_p=1.5), "--dropout-p"),
    (lambda: plain_vs_residual.Settings(n_blocks=0), "--n-blocks"),
    (lambda: init_variance.Settings(batch=1), "--batch"),
    (lambda: init_variance.Settings(models=("VGG",)), "--models"),
    (lambda: landscape.Settings(), "--plain"),
    (lambda: landscape.Settings(train_own=True, radius=float("nan")), "--radius"),
    (lambda: landscape.Settings(train_own=True, points=1), "--points"),
])
def test_settings_check_their_values(make, words):
    with pytest.raises(ConfigError, match=words):
        make()


def test_landscape_refuses_a_missing_run_before_writing(tmp_path):
    config = quick_config(landscape, tmp_path / "out")
    with pytest.raises(ConfigError, match="--plain .*no such run directory"):
        landscape.run(config, landscape.Settings(plain=tmp_path / "nonexistent"))
    assert not (tmp_path / "out").exists()


def test_configure_scales_milestones_from_the_notebooks_run():
    base = plain_vs_residual.BASE
    assert common.configure(base, recipe={"epochs": 4}).recipe.milestones == (2, 3)
    assert common.configure(base, recipe={"epochs": 30}).recipe.milestones == (16, 24)
    assert common.configure(base).recipe.milestones == (8, 12)
    # the user's epochs over the preset's scale from the notebook's 15, not from the preset's 4
    quick_30 = common.configure(base, plain_vs_residual.QUICK, recipe={"epochs": 30})
    assert (quick_30.recipe.epochs, quick_30.recipe.milestones, quick_30.recipe.batch_size) == (30, (16, 24), 32)
    assert ablation.BASE.recipe.epochs == 10 and ablation.BASE.recipe.schedule == "cosine"
    # a preset's image size is for generated data; its model arguments only where the model takes them
    assert common.configure(depth.BASE, depth.QUICK, data={"dataset": "cifar10"}).data.image_size == 32
    resnet18 = compare.BASE.replace(model=ModelConfig("ResNet18"))
    assert common.configure(resnet18, compare.QUICK).model.kwargs == {}
    with pytest.raises(ConfigError, match="--epochs"):
        common.configure(base, Preset("p"), recipe={"epochs": 0})


# --------------------------------------------------------------------------------------- parser, helpers
def test_each_experiment_module_runs_the_settings_the_parser_shows():
    """The command line reads ``settings.EXPERIMENTS`` and imports ``flax_resnet.experiments.<module>`` after
    parsing: each module is the one its record names, with the record's name, defaults, settings and preset."""
    modules = (plain_vs_residual, depth, init_variance, ablation, landscape, compare)
    assert [e.module for e in EXPERIMENTS] == [m.__name__.rpartition(".")[2] for m in modules]
    for experiment, module in zip(EXPERIMENTS, modules, strict=True):
        assert (module.NAME, module.BASE, module.Settings, module.QUICK) == (
            experiment.name, experiment.base, experiment.settings, experiment.quick)


def test_help_lists_every_experiment(capsys):
    assert run_main(["--help"]) == 0
    out = capsys.readouterr().out
    for experiment in EXPERIMENTS:
        assert experiment.name in out
        assert run_main([experiment.name, "--help"]) == 0
        quick_values = capsys.readouterr().out.split("--quick sets (where not given): ")[1]
        preset = experiment.quick
        flags = (experiments_cli.SETTING_FLAGS.get(k, k) for k in preset.settings)  # None: set by --quick only
        names = [*preset.recipe, *preset.data, *preset.model_kwargs, *(f for f in flags if f)]
        for name in names:  # each option --quick sets, whole (not split at a hyphen by the wrapping)
            assert f"--{name.replace('_', '-')}" in quick_values


@pytest.mark.parametrize("argv", [
    ["landscape"],  # no networks named and not --quick
    ["landscape", "--plain", "/nonexistent/run"],
    ["depth", "--plain-blocks", "1,1,1"],
    ["depth", "--image-size", "8"],  # synthetic only
    ["ablation", "--dropout-p", "1.5"],
    ["compare", "--model", "ResNet18", "--n-blocks", "2"],
    ["plain-vs-residual", "--resume", "--overwrite"],
    ["he-init", "--batch", "1"],
])
def test_usage_errors_exit_2_before_writing(argv, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main([*argv, "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("argv", "words"), [
    (["plain-vs-residual", "--init-from", "w.pt"], "plain-vs-residual does not take --init-from"),
    (["depth", "--init-from", "w.pt"], "depth does not take --init-from"),
    (["ablation", "--init-from", "w.pt"], "ablation does not take --init-from"),
    (["landscape", "--quick", "--init-from", "w.pt"], "landscape does not take --init-from"),
    (["compare", "--precision", "bf16"], "compare does not take --precision"),
    (["he-init", "--framework", "torch"], "he-init does not take --framework"),
    (["he-init", "--parallel", "pmap"], "he-init does not take --parallel"),
    (["plain-vs-residual", "--coordinator", "h:1"], "unrecognized arguments: --coordinator"),
])
def test_a_train_option_an_experiment_cannot_honour_is_refused_in_one_line(argv, words, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in err, err
    assert words in err, err
    assert not out.exists()


def test_the_command_line_hands_train_options_to_every_run(tmp_path, monkeypatch, capsys):
    """What `train` accepts reaches each run of an experiment as it is: devices, precision, seed, the recipe
    numbers over the preset's, checkpoints kept."""
    fake = FakeTrain()
    monkeypatch.setattr(training, "train", fake)
    out = tmp_path / "depth"
    assert run_main(["depth", "--quick", "--no-progress", "--out", str(out), "--precision", "bf16", "--parallel",
                     "single", "--bn-sync", "off", "--seed", "7", "--max-to-keep", "1", "--epochs", "30",
                     "--recipe", "resnet18-cifar"]) == 0
    configs = [config for config, _ in fake.calls]
    assert [c.output.out_dir.name for c in configs] == ["PlainNet-1-1-1-1", "PlainNet-2-2-2-2", "SimpleResNet-n1",
                                                        "SimpleResNet-n2"]
    for config in configs:
        assert (config.precision, config.parallel, config.seed) == ("bf16", ParallelConfig("single", False), 7)
        assert (config.recipe.name, config.recipe.epochs, config.recipe.batch_size) == ("resnet18-cifar", 30, 32)
        assert (config.data.dataset, config.data.image_size, config.output.max_to_keep) == ("synthetic", 8, 1)
    settings = json.loads((out / common.RESULTS_FILE).read_text())["settings"]
    assert settings["precision"] == "bf16" and settings["experiment"]["resnet_blocks"] == [1, 2]
    assert "depth: done" in capsys.readouterr().out


def test_markdown_table_and_json():
    table = tables.format_table(["a", "b"], [["x", 1.5], ["yy", "n/a"]], markdown=True)
    lines = table.splitlines()
    assert lines[0].startswith("| a") and "--: |" in lines[1] and len({len(line) for line in lines}) == 1
    assert common.to_jsonable({"v": [np.float32(1.5), float("nan")], "p": Path("x")}) == {"v": [1.5, None], "p": "x"}
    assert common.fmt(float("inf")) == "n/a" and common.fmt(12.345, ".1f", "%") == "12.3%"


@pytest.mark.parametrize("command", [e.name for e in EXPERIMENTS])
def test_an_experiment_refuses_an_out_in_use_or_unwritable(command, tmp_path, capsys):
    """Like `train`, an experiment claims --out first: a second run on it, or an --out under a file, is one clear
    error (exit 1) before any data is loaded or anything trained, and the holder's files are untouched."""
    from flax_resnet.training.outdir import claim_output_dir

    out = tmp_path / "busy"
    with claim_output_dir(out):
        assert run_main([command, "--quick", "--no-progress", "--out", str(out)]) == 1
        err = " ".join(capsys.readouterr().err.split())  # fail() wraps its paragraph
        assert "is in use by another run" in err and f"pid {os.getpid()}" in err, err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    (tmp_path / "file").write_text("x")
    assert run_main([command, "--quick", "--no-progress", "--out", str(tmp_path / "file" / "out")]) == 1
    assert "cannot create the output directory" in " ".join(capsys.readouterr().err.split())


def test_landscape_reads_a_torch_run_and_refuses_a_damaged_one(tmp_path, capsys):
    """A `--framework torch` run's latest checkpoint (the one store, torch layout) is ported with its digest
    checked; a damaged one is a one-line error (exit 1), not a traceback."""
    import torch

    from flax_resnet._codecs import torch_model_arrays
    from flax_resnet.experiments.landscape import load_network
    from flax_resnet.port import to_torch_state_dict
    from flax_resnet.store import CheckpointError, CheckpointStore

    run = tmp_path / "torch-run"
    assert run_main(["train", "--model", "SimpleResNet", "--n-blocks", "1", "--dataset", "synthetic",
                     "--train-samples", "64", "--test-samples", "16", "--epochs", "1", "--batch-size", "32",
                     "--framework", "torch", "--no-progress", "--out", str(run)]) == 0
    arrays, meta = CheckpointStore(run / "checkpoints").read(1)
    assert meta["framework"] == "torch"
    net = load_network(run)
    assert (net.name, net.epoch) == ("SimpleResNet", 1)
    ported = to_torch_state_dict(net.model)
    saved = torch_model_arrays(arrays)
    assert saved and all(torch.equal(ported[k], torch.from_numpy(v)) for k, v in saved.items())

    file = run / "checkpoints" / "epoch_0001" / "arrays.safetensors"
    file.write_bytes(file.read_bytes()[:-200])  # truncated
    with pytest.raises(CheckpointError, match="checkpoint 1 .* is unreadable: arrays.safetensors .*cut short"):
        load_network(run)
    capsys.readouterr()
    assert run_main(["landscape", "--no-progress", "--dataset", "synthetic", "--train-samples", "64",
                     "--test-samples", "16", "--checkpoint", str(run), "--out", str(tmp_path / "ls")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is unreadable" in " ".join(err.split()) and "Traceback" not in err, err
