"""N devices equal PyTorch DDP (``train.py verify --devices N``, ``flax_resnet.parity.devices``,
``torch_ref.ddp``): the command users run, for both BatchNorm settings; a mismatched BatchNorm fails; the
synchronised BatchNorm of the DDP reference against SyncBatchNorm's formulas.

The verify runs start a Flax subprocess (2 simulated CPU devices) and 2 DDP processes each, so they run once, in a
module fixture, and the tests read what they printed and computed.
"""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from torch_ref import ddp

# one block, 16x16: every BatchNorm sees at least 2 x 4 x 4 values per channel on each of the 2 devices
VERIFY = ["verify", "--model", "SimpleResNet", "--n-blocks", "1", "--devices", "2", "--steps", "2", "--batch", "4",
          "--image-size", "16"]


def _run_main(argv: list[str]) -> tuple[int, str, str]:
    from flax_resnet import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def verified():
    """``verify --devices 2 --steps 2`` with --bn-sync on and off: exit code, output, and what each side computed
    (recorded on the way, for the mismatch test)."""
    from flax_resnet.parity import devices

    recorded: dict[str, dict] = {"on": {}, "off": {}}
    results = {}
    run_flax, run_ddp = devices.run_flax, devices.run_ddp
    with pytest.MonkeyPatch.context() as mp:
        for setting in ("on", "off"):
            mp.setattr(devices, "run_flax", lambda *a, _s=setting, **k: recorded[_s].setdefault("flax",
                                                                                          run_flax(*a, **k)))
            mp.setattr(devices, "run_ddp", lambda *a, _s=setting, **k: recorded[_s].setdefault("ddp",
                                                                                        run_ddp(*a, **k)))
            results[setting] = _run_main([*VERIFY, "--bn-sync", setting])
    return results, recorded


@pytest.mark.parametrize("setting", ["on", "off"])
def test_verify_devices_equals_ddp(verified, setting):
    code, out, err = verified[0][setting]
    assert code == 0, out[-3000:] + err[-3000:]
    lines = out.rstrip().splitlines()
    assert lines[-1].startswith("OK: ") and "equal to DDP within 1e-10" in lines[-1]
    bn = "synchronised BatchNorm" if setting == "on" else "plain BatchNorm"
    assert f"torch DDP, 2 processes, {bn} (rank 0)" in out
    rows = {line.split("  ")[0]: line for line in lines if line.startswith("Flax,")}
    assert {"Flax, 2 devices, shard_map", "Flax, 2 devices, pmap", "Flax, 1 device (single)"} <= set(rows)
    for path, line in rows.items():
        if path == "Flax, 1 device (single)" and setting == "off":  # the control: global BatchNorm must differ
            assert "differs, as it must" in line, line
        else:
            assert line.rstrip().endswith("equal"), line


def test_a_mismatched_batchnorm_fails(verified):
    """Flax with per-device BatchNorm against DDP with the synchronised one, and the other way round: every
    N-device path differs beyond the tolerance (by far: BatchNorm statistics of 2 x 4 x 4 values against 4 x 4 x 4)."""
    from flax_resnet.parity import devices

    recorded = verified[1]
    parameters = [k for k in recorded["on"]["ddp"].state_dict if not k.rpartition(".")[2].startswith(
        ("running_", "num_batches"))]
    for flax_setting, ddp_setting in (("off", "on"), ("on", "off")):
        runs, _ = recorded[flax_setting]["flax"]
        rows = devices.compare(recorded[ddp_setting]["ddp"], runs, parameters)
        parallel_rows = [r for r in rows if "devices" in r.path]
        assert parallel_rows and all(not r.ok and r.statistics > 1e-6 for r in parallel_rows), rows


def test_report_table_and_verdict():
    """The comparison on made-up runs: equal runs pass, a parameter 1e-8 off fails and is named, a control row
    that does not differ fails the report."""
    from flax_resnet.parity import devices

    state = {"w": np.array([1.0, -2.0]), "bn.running_mean": np.array([0.5]), "bn.num_batches_tracked": np.array(2)}
    ddp_run = devices.Run("torch DDP", np.array([2.3, 2.1]), state)
    same = devices.Run("Flax, 2 devices, pmap", np.array([2.3, 2.1 + 1e-15]), dict(state))
    off = devices.Run("Flax, 2 devices, shard_map", np.array([2.3, 2.1]), {**state, "w": np.array([1.0, -2 + 2e-8])})
    rows = devices.compare(ddp_run, [same, off], ["w"])
    assert [r.ok for r in rows] == [True, False]
    assert math.isclose(rows[1].parameters, 1e-8, rel_tol=1e-6) and rows[1].statistics == 0
    report = devices.DeviceReport("M()", 2, 2, True, 4, 16, ddp_run.name, rows)
    assert not report.ok and report.table().splitlines()[-1] == "DIFFERENT: Flax, 2 devices, shard_map"
    control = devices.compare(ddp_run, [same], ["w"], control=same.name)
    assert not devices.DeviceReport("M()", 2, 2, False, 4, 16, ddp_run.name, control).ok
    missing = devices.compare(ddp_run, [devices.Run("x", ddp_run.losses, {"w": state["w"]})], ["w"])
    assert missing[0].statistics == math.inf and not missing[0].ok


@pytest.mark.parametrize("argv, words", [
    (["--bn-sync", "off"], ["--bn-sync", "--devices"]),
    (["--devices", "2", "--batch", "3"], ["--batch 3", "--devices 2"]),
    (["--devices", "1"], ["--devices", ">= 2"]),
])
def test_verify_devices_refuses_settings_before_running(argv, words):
    code, out, err = _run_main(["verify", "--model", "SimpleResNet", *argv])
    assert code == 2 and all(w in err for w in words), err


# ------------------------------------------------------------------------------------------ SyncBatchNorm
def _sync_bn_rank(rank: int, world_size: int, x: torch.Tensor, w: torch.Tensor) -> dict:
    """This rank's share of ``x`` through ``ddp.SyncBatchNorm`` (and, as a control, plain BatchNorm) in train mode;
    the output, the gradients of sum(out * w) and the running statistics."""
    share = x.shape[0] // world_size
    rows = slice(rank * share, (rank + 1) * share)
    xs = x[rows].clone().requires_grad_(True)
    bn = ddp.SyncBatchNorm(x.shape[1]).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, -1.0], dtype=torch.float64))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    out = bn(xs)
    (out * w[rows]).sum().backward()
    plain = torch.nn.BatchNorm2d(x.shape[1]).double()
    plain.load_state_dict(bn.state_dict())  # the same weights; in train mode it normalises with this share alone
    return {"out": out.detach(), "x_grad": xs.grad, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
            "running_mean": bn.running_mean, "running_var": bn.running_var, "tracked": bn.num_batches_tracked,
            "plain_out": plain(x[rows]).detach()}


def test_sync_batchnorm_follows_syncbatchnorms_formulas():
    """Two ranks: the output is BatchNorm with the mean and biased variance of all ranks' samples, the running
    variance the unbiased one over all (n = 2 x 2 x 4 x 4), the input gradients those of BatchNorm over the whole
    batch and the parameter gradients, summed over ranks, too (to 1e-12: float64 rounding; per-rank statistics are
    off by more than 1e-1 here: rank 1's samples are shifted by 3, as the control shows)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    x[2:] += 3.0
    w = torch.randn(4, 3, 4, 4, generator=g, dtype=torch.float64)
    ranks = ddp.spawn(_sync_bn_rank, 2, (x, w), timeout_s=120)

    gamma, beta = torch.tensor([1.5, 0.5, -1.0], dtype=torch.float64), torch.tensor([0.1, -0.2, 0.3],
                                                                                     dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    params = [gamma.clone().requires_grad_(True), beta.clone().requires_grad_(True)]
    mean = xr.mean((0, 2, 3), keepdim=True)
    var = xr.var((0, 2, 3), unbiased=False, keepdim=True)
    want = (xr - mean) / torch.sqrt(var + 1e-5) * params[0].view(1, -1, 1, 1) + params[1].view(1, -1, 1, 1)
    (want * w).sum().backward()
    n = x.numel() // x.shape[1]
    running_var = 0.9 + 0.1 * x.var((0, 2, 3), unbiased=True)
    assert n == 64 and torch.allclose(running_var, 0.9 + 0.1 * var.detach().flatten() * n / (n - 1))

    def close(got, expected):
        error = float((got - expected).abs().max() / expected.abs().max())
        assert error <= 1e-12, error
        return True

    assert close(torch.cat([r["out"] for r in ranks]), want.detach())
    assert close(torch.cat([r["x_grad"] for r in ranks]), xr.grad)
    assert close(sum(r["weight_grad"] for r in ranks), params[0].grad)
    assert close(sum(r["bias_grad"] for r in ranks), params[1].grad)
    for r in ranks:
        assert close(r["running_mean"], 0.1 * mean.detach().flatten())
        assert close(r["running_var"], running_var)
        assert int(r["tracked"]) == 1
    # the control: per-rank statistics are far from the global ones on this batch
    plain = torch.cat([r["plain_out"] for r in ranks])
    assert float((plain - want.detach()).abs().max()) > 1e-1
