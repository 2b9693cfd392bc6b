"""The speed benchmark (flax_resnet.bench): one ``bench --quick`` run through the command line, then checks of its
table and JSON. No timing assertions: the speed is what the benchmark shows, not what a test can assert on a
shared 2-core machine."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

from flax_resnet import bench, builders, cli
from flax_resnet.config import BENCH_QUICK, BenchConfig, ConfigError


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python train.py bench --quick --json FILE`` (about 30 s on 2 busy cores): its stdout and its JSON."""
    path = tmp_path_factory.mktemp("bench") / "rows.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["bench", "--quick", "--json", str(path)])
    assert code == 0
    return out.getvalue(), json.loads(path.read_text())


def test_table_has_every_row_and_column(quick_run):
    table, _ = quick_run
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("phase"))
    for title in bench.COLUMNS.values():
        assert title in header
    for phase in bench.PHASES:
        for impl in bench.IMPLS:
            assert any(line.startswith(phase) and f" {impl} " in line for line in lines), (phase, impl, table)
    assert "SimpleResNet(n_blocks=1), batch 16, fp32" in table


def test_json_rows_are_complete_and_figures_positive(quick_run):
    _, doc = quick_run
    rows = doc["rows"]
    assert {"jax", "torch", "device_kind", "load_avg"} <= set(doc["environment"])
    assert {(r["impl"], r["phase"]) for r in rows} == {(i, p) for i in bench.IMPLS for p in bench.PHASES}
    for row in rows:
        assert set(bench.COLUMNS) <= set(row)
    ok = [r for r in rows if r["status"] == "ok"]
    # everything but torch.compile (skipped in --quick: it compiles for about a minute) ran
    assert {(r["impl"], r["phase"]) for r in ok} == {(i, p) for i in bench.IMPLS[:3] for p in bench.PHASES}
    for r in ok:
        for key in ("images_per_s", "ms_median", "gflop", "flax_speedup"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (key, r)
        if r["phase"] != "epoch":
            assert 0 < r["ms_p10"] <= r["ms_median"] <= r["ms_p90"], r
        assert r["peak_mem_mb"] is None or r["peak_mem_mb"] > 0
        assert (r["peak_mem_mb"] is None) == (r["peak_mem_kind"] is None), r  # no kind named for an n/a
    flax = {r["phase"]: r for r in ok if r["impl"] == "flax"}
    for phase in ("train step", "eval step"):
        assert flax[phase]["compile_s"] > 0 and flax[phase]["xla_gflop"] > 0
        assert flax[phase]["flax_speedup"] == pytest.approx(1.0)
    assert flax["epoch"]["epoch_s"] > 0
    # training counts forward + both gradients: three times the eval step's FLOPs
    assert flax["train step"]["gflop"] == pytest.approx(3 * flax["eval step"]["gflop"])
    for r in rows:
        if r["impl"].startswith("torch.compile"):
            assert r["status"].startswith("n/a: skipped")


def test_flop_count_matches_the_known_resnet_sizes():
    """ResNet-20 is 40.8 M multiply-adds per CIFAR image, the CIFAR ResNet-18 555 M (conv + fc)."""
    resnet20 = builders.build_flax("SimpleResNet", {"n_blocks": 3})
    assert bench.count_forward_macs(resnet20, 1) == pytest.approx(40.8e6, rel=0.005)
    assert bench.count_forward_macs(resnet20, 4) == 4 * bench.count_forward_macs(resnet20, 1)
    resnet18 = builders.build_flax("ResNet18")
    assert bench.count_forward_macs(resnet18, 1) == pytest.approx(555.4e6, rel=0.005)


def test_peak_table_and_formatting():
    assert bench._peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4)
    assert bench._peak_tflops("NVIDIA H100 PCIe", "fp32") == pytest.approx(378.0)
    assert bench._peak_tflops("NVIDIA H200", "bf16") == pytest.approx(989.4)
    assert bench._peak_tflops("cpu", "fp32") is None
    assert bench.format_table([], "any CPU").splitlines()[0].startswith("phase")


def test_xla_flops_are_read_from_either_structure_of_the_cost_analysis():
    """jax 0.10 returns a dict, older jax a list of one dict per computation; what has no flops is no figure."""
    assert bench.xla_gflop({"flops": 2.5e9, "bytes accessed": 1.0}) == pytest.approx(2.5)
    assert bench.xla_gflop([{"flops": 4e9}]) == pytest.approx(4.0)
    for cost in (None, {}, [], {"flops": -1.0}, {"flops": 0.0}, "n/a", [None]):
        assert bench.xla_gflop(cost) is None, cost


def test_bad_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--model", "ResNet18", "--n-blocks", "2"])
    assert e.value.code == 2
    assert "does not take --n-blocks" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--precision"):
        BenchConfig(batch_size=8, precision="fp16", warmup=0, steps=1)
    for batch, warmup, steps, images in ((0, 0, 1, 0), (8, -1, 1, 0), (8, 0, 0, 0), (8, 0, 1, -1)):
        with pytest.raises(ConfigError, match="must be >= 1"):
            BenchConfig(batch_size=batch, warmup=warmup, steps=steps, epoch_images=images)
    with pytest.raises(ValueError, match="does not take"):  # the library checks the model's arguments too
        bench.run_benchmark(BenchConfig("ResNet18", {"n_blocks": 2}))


def test_quick_is_a_preset_under_the_users_values():
    """``bench --quick`` starts from ``BENCH_QUICK``; an option the user gives wins over it."""
    from flax_resnet.cli.bench import bench_config

    parser = cli.build_parser()
    assert bench_config(parser.parse_args(["bench", "--quick"])) == BENCH_QUICK
    assert bench_config(parser.parse_args(["bench"])) == BenchConfig(model_kwargs={"n_blocks": 3})  # filled in
    mine = bench_config(parser.parse_args(["bench", "--quick", "--batch-size", "8", "--steps", "3",
                                           "--torch-compile", "--precision", "bf16"]))
    assert mine == BenchConfig(model_kwargs={"n_blocks": 1}, batch_size=8, warmup=2, steps=3, epoch_images=256,
                               torch_compile=True, precision="bf16")
    other = bench_config(parser.parse_args(["bench", "--quick", "--model", "PlainDeepCNN"]))
    assert (other.model, other.model_kwargs, other.batch_size) == ("PlainDeepCNN", {"n_blocks": 3}, 16)


def test_resident_channels_last_batches_are_the_default_loaders_batches():
    """The bench's torch batches (``PlannedBatches(resident=True, memory_format=channels_last)``, prepared where
    the model runs) are the training loop's, value for value, only laid out channels-last."""
    import numpy as np
    import torch

    from flax_resnet.data import plan
    from torch_ref.data import PlannedBatches

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 40).astype(np.int32)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    loader = PlannedBatches(images, labels, 16, mean, std)
    resident = PlannedBatches(images, labels, 16, mean, std, device="cpu", resident=True,
                              memory_format=torch.channels_last)
    p = plan.epoch_plan(1, 0, 40)
    for batches in (loader, resident):
        batches.set_plan(p.permutation, p.offsets, p.flips)
    pairs = list(zip(loader, resident, strict=True))
    assert len(pairs) == 3  # 40 = 16 + 16 + 8
    for (x, y), (xr, yr) in pairs:
        assert torch.equal(x, xr) and torch.equal(y, yr)
        assert xr.is_contiguous(memory_format=torch.channels_last) and x.is_contiguous()


FAKE_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw
bogomips\t: 4000.00

processor\t: 1
model name\t: Another CPU that is not read
flags\t\t: fpu
"""


def test_cpu_description_reads_model_and_vector_extensions():
    """The first processor's model and flags; AVX-512 from avx512f; no cpuinfo: platform.processor(), unknown
    extensions. The bench header and its JSON carry it."""
    intel = bench.describe_cpu(FAKE_CPUINFO)
    assert intel["model"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert (intel["avx2"], intel["fma"], intel["avx512"]) == (True, True, True)
    assert intel["text"] == "Intel(R) Xeon(R) Platinum 8480+ (AVX2 yes, FMA yes, AVX-512 yes)"
    amd = bench.describe_cpu("processor : 0\nmodel name : AMD EPYC\nflags : fma avx avx2\n")
    assert (amd["avx2"], amd["fma"], amd["avx512"]) == (True, True, False)
    elsewhere = bench.describe_cpu("")
    assert elsewhere["source"] == "platform.processor()" and elsewhere["model"]
    assert (elsewhere["avx2"], elsewhere["fma"], elsewhere["avx512"]) == (None, None, None)
    assert "AVX-512 unknown" in elsewhere["text"]
    row = {**bench._row("flax", "train step"), "model": "SimpleNet", "model_kwargs": {}, "batch_size": 2,
           "precision": "fp32", "platform": "cpu", "device_kind": "cpu"}
    assert "CPU: Intel(R) Xeon(R) Platinum 8480+ (AVX2 yes" in bench.format_table([row], intel["text"])
    assert "cpu" in bench.environment()
