"""Training-step parity (``parity.compare_training``): the documented torch -> optax optimizer and schedule pairs
take the same steps, every diagnosis fires on its planted fault and on nothing else, the given models come out
as they went in.

All in float64 on SimpleResNet(n_blocks=1) (BatchNorm: its running statistics and counters are compared) with
2 x 3 x 16 x 16 batches, 2-3 steps: the SGD pairs and schedules agree to 4e-15, the Adam pairs to 2.7e-13
(measured), against the 1e-12 / 1e-10 tolerance of ``parity.TOLERANCES['float64']``; every planted fault is off
by 1e-8 or more. Adam's figure is stage3.0.conv2.weight at step 1: an entry whose gradient is about eps in size,
where g / (|g| + eps) amplifies the gradient's rounding; it grows with the learning rate, so Adam runs at 1e-3.
"""

from __future__ import annotations

import numpy as np
import optax
import pytest
import torch
from flax import nnx

from flax_resnet import builders, parity
from flax_resnet.port import to_numpy_state_dict

SHAPE = (2, 3, 16, 16)
LR, WD = 0.1, 5e-4


@pytest.fixture(scope="module")
def pair():
    """torch's SimpleResNet(1) (random BatchNorm statistics) and its Flax twin holding the same weights."""
    torch_model = builders.build_torch("SimpleResNet", {"n_blocks": 1}, seed=0)
    parity.perturb_batchnorm(torch_model)
    flax_model = builders.build_flax_to_fill("SimpleResNet", {"n_blocks": 1})
    from flax_resnet.port import load_torch_state_dict

    load_torch_state_dict(flax_model, torch_model.state_dict())
    return torch_model, flax_model


def run(pair, torch_optimizer, flax_optimizer, **kwargs) -> parity.TrainingReport:
    kwargs.setdefault("steps", 2)
    return parity.compare_training(*pair, torch_optimizer, flax_optimizer, input_shape=SHAPE, **kwargs)


def assert_exact(report: parity.TrainingReport, moments: tuple[str, ...]) -> None:
    assert report.ok, str(report)
    assert report.first_step is None and report.first_divergence is None
    assert report.diagnosis == []
    sections = {row.section for row in report.rows}
    assert {"loss", "parameters", "running statistics"} <= sections
    assert {f"{buffer} / {field}" for buffer, field in moments} <= sections, sections
    assert any(row.name.endswith("num_batches_tracked") for row in report.rows)
    assert str(report).splitlines()[-1].startswith("OK: all")


# ------------------------------------------------------------------------------------------- optimizer pairs
@pytest.mark.parametrize(("momentum", "nesterov", "wd"), [(0.9, False, WD), (0.9, True, WD), (0.0, False, 0.0)],
                         ids=["momentum-decay", "nesterov-decay", "plain"])
def test_sgd_and_its_optax_chain_take_the_same_steps(pair, momentum, nesterov, wd):
    """torch adds wd * p to the gradient before the momentum (coupled): add_decayed_weights first in the chain;
    optax's trace starts at zero, so its first step is the gradient, as torch's momentum buffer is."""
    report = run(pair, lambda p: torch.optim.SGD(p, lr=LR, momentum=momentum, nesterov=nesterov, weight_decay=wd),
                 optax.chain(optax.add_decayed_weights(wd), optax.sgd(LR, momentum=momentum or None,
                                                                      nesterov=nesterov)))
    assert_exact(report, (("momentum_buffer", "trace"),) if momentum else ())


ADAM_PAIRS = {
    "adam": (lambda p: torch.optim.Adam(p, lr=1e-3), optax.adam(1e-3)),
    "adam-coupled-decay": (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=WD),
                           optax.chain(optax.add_decayed_weights(WD), optax.adam(1e-3))),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2), optax.adamw(1e-3, weight_decay=1e-2)),
}


@pytest.mark.parametrize("name", list(ADAM_PAIRS))
def test_adam_and_adamw_take_the_same_steps(pair, name):
    """Both put eps outside the square root of the bias-corrected second moment; AdamW's lr * wd * p is applied
    beside the Adam update in both (torch multiplies p by 1 - lr * wd first, optax adds wd * p to the update
    before the learning rate)."""
    torch_optimizer, flax_optimizer = ADAM_PAIRS[name]
    report = run(pair, torch_optimizer, flax_optimizer)
    assert_exact(report, (("exp_avg", "mu"), ("exp_avg_sq", "nu")))


SCHEDULES = {
    "StepLR": (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
               optax.exponential_decay(LR, transition_steps=1, decay_rate=0.5, staircase=True), [LR, LR, LR / 2]),
    "MultiStepLR": (lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[1, 3], gamma=0.1),
                    optax.piecewise_constant_schedule(LR, {1: 0.1, 3: 0.1}), [LR, LR, LR / 10]),
    "CosineAnnealingLR": (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3, eta_min=0.01),
                          optax.cosine_decay_schedule(LR, decay_steps=3, alpha=0.01 / LR),
                          [LR, LR, 0.01 + (LR - 0.01) * 0.75]),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_per_epoch_torch_schedulers_as_optax_schedules(pair, name):
    """Two steps per epoch, three steps: the rate changes at step 3, after torch's first scheduler.step()."""
    torch_scheduler, schedule, lrs = SCHEDULES[name]
    report = run(pair, lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9),
                 optax.sgd(parity.per_epoch(schedule, 2), momentum=0.9), steps=3, torch_scheduler=torch_scheduler,
                 steps_per_epoch=2)
    assert report.torch_lrs == pytest.approx(lrs, rel=1e-15)
    assert_exact(report, (("momentum_buffer", "trace"),))


def test_per_epoch_counts_epochs():
    schedule = parity.per_epoch(lambda epoch: 10 * epoch, 3)
    assert [schedule(step) for step in range(7)] == [0, 0, 0, 10, 10, 10, 20]
    with pytest.raises(ValueError, match="steps_per_epoch"):
        parity.per_epoch(lambda epoch: epoch, 0)


def test_one_batch_per_step_with_its_labels(pair):
    rng = np.random.default_rng(5)
    inputs = [rng.standard_normal(SHAPE) for _ in range(2)]
    labels = [np.array([1, 7]), np.array([3, 3])]
    report = parity.compare_training(*pair, lambda p: torch.optim.SGD(p, lr=LR), optax.sgd(LR), steps=2,
                                     inputs=inputs, labels=labels)
    assert report.ok, str(report)
    assert "one batch per step" in str(report) and "the given labels" in str(report)
    with pytest.raises(ValueError, match="one batch per step"):
        parity.compare_training(*pair, lambda p: torch.optim.SGD(p, lr=LR), optax.sgd(LR), steps=3, inputs=inputs)


# ------------------------------------------------------------------------------------------ planted faults
def test_weight_decay_left_out_of_the_flax_chain(pair):
    """torch's SGD decays, the optax chain lacks add_decayed_weights: after step 1 every weight that is not zero
    is off by +lr * wd * p (BatchNorm biases start at 0 and stay equal)."""
    report = run(pair, lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, weight_decay=WD),
                 optax.sgd(LR, momentum=0.9))
    assert not report.ok and report.first_step == 1
    assert report.first_divergence == "step 1: conv1.weight"
    assert len(report.diagnosis) == 1, report.diagnosis
    assert "+lr*wd*p" in report.diagnosis[0] and "leaves out the weight decay of torch's SGD" in report.diagnosis[0]
    assert "add_decayed_weights" in report.diagnosis[0] and report.diagnosis[0] in str(report)


def test_adamw_in_flax_for_a_coupled_torch_adam(pair):
    """torch's Adam adds wd * p to the gradient (then normalises it away, mostly); optax.adamw subtracts
    lr * wd * p beside the update: the Flax weights are off by -lr * wd * p."""
    report = run(pair, lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.1), optax.adamw(1e-3, weight_decay=0.1))
    assert report.first_step == 1
    assert len(report.diagnosis) == 1, report.diagnosis
    assert "-lr*wd*p" in report.diagnosis[0] and "decoupled (optax.adamw)" in report.diagnosis[0]


def test_coupled_decay_in_flax_for_a_torch_adamw(pair):
    report = run(pair, lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1),
                 optax.chain(optax.add_decayed_weights(0.1), optax.adam(1e-3)))
    assert report.first_step == 1
    assert len(report.diagnosis) == 1, report.diagnosis
    assert "+lr*wd*p" in report.diagnosis[0] and "torch's AdamW" in report.diagnosis[0]


def test_optax_adamw_default_weight_decay_for_torch_adamw(pair):
    """optax.adamw's weight_decay defaults to 1e-4, torch AdamW's to 1e-2: the Flax decay is read back."""
    report = run(pair, lambda p: torch.optim.AdamW(p, lr=1e-3), optax.adamw(1e-3))
    assert len(report.diagnosis) == 1, report.diagnosis
    assert "the weight decays differ, the Flax optimizer's amounts to 0.0001, torch's AdamW has 0.01" \
        in report.diagnosis[0]


def test_nesterov_on_one_side_only(pair):
    """At step 1 Nesterov momentum is the plain step times 1 + momentum: named beside the learning rate."""
    report = run(pair, lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, nesterov=True), optax.sgd(LR, 0.9))
    assert report.first_step == 1 and len(report.diagnosis) == 1, report.diagnosis
    assert "or Nesterov momentum on one side only" in report.diagnosis[0]


def test_schedule_stepped_per_step_instead_of_per_epoch(pair):
    """torch's StepLR moves at the epoch boundary (after step 2 of 2), the bare optax schedule after step 1: the
    steps agree at step 1 and part at step 2, where every Flax update is half torch's."""
    report = run(pair, lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9),
                 optax.sgd(lambda count: LR * 0.5 ** count, momentum=0.9), steps=3,
                 torch_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
                 steps_per_epoch=2)
    assert report.first_step == 2
    assert len(report.diagnosis) == 1, report.diagnosis
    line = report.diagnosis[0]
    assert line.startswith("step 2: every parameter moves by 0.5 x torch's update")
    assert "stepped per step instead of per epoch" in line and "per_epoch(schedule, steps_per_epoch=2)" in line


def test_a_rate_rounded_to_float32_by_an_optax_schedule(pair):
    """``optax.exponential_decay`` called with optax's int32 count divides it in float32, so a float64 run's rate
    is 0.1 rounded to float32 (``per_epoch`` hands on the epoch as int64 instead): 1.5e-8 apart, named."""
    schedule = optax.exponential_decay(LR, transition_steps=1, decay_rate=0.5, staircase=True)
    report = run(pair, lambda p: torch.optim.SGD(p, lr=LR), optax.sgd(schedule))
    assert report.first_step == 1
    assert report.diagnosis == [f"step 1: every parameter moves by {float(np.float32(LR)) / LR:.12g} x torch's "
                                f"update: the learning rates differ (Flax {float(np.float32(LR)):.12g}, torch 0.1)"]


def test_a_learning_rate_that_differs_is_named_without_a_schedule(pair):
    report = run(pair, lambda p: torch.optim.SGD(p, lr=LR), optax.sgd(LR / 4))
    assert report.first_step == 1
    assert report.diagnosis == ["step 1: every parameter moves by 0.25 x torch's update: the learning rates differ "
                                "(Flax 0.025, torch 0.1)"]


def test_running_statistics_in_the_other_momentum_convention(pair):
    """A BatchNorm given Flax's momentum 0.9 as torch's (which weights the new batch): the step-1 loss agrees
    (train mode normalises with the batch's statistics), the running statistics do not; they are named first."""
    torch_model, flax_model = pair
    wrong = nnx.clone(flax_model)
    wrong.bn1.torch_momentum = 0.9
    report = run((torch_model, wrong), lambda p: torch.optim.SGD(p, lr=LR), optax.sgd(LR))
    assert report.first_divergence == "step 1: bn1.running_mean"
    assert any(line.startswith("step 1: the loss or running statistics differ before any update")
               for line in report.diagnosis), report.diagnosis
    # parity.diagnosis.running_statistic, recomputed from the update: Flax weighted the batch by 0.9, torch by 0.1
    assert any(line.startswith("bn1.running_mean: running statistics updated with the other momentum convention")
               for line in report.diagnosis), report.diagnosis


def test_weights_not_ported(pair):
    torch_model, flax_model = pair
    wrong = nnx.clone(flax_model)
    wrong.fc.bias[...] = wrong.fc.bias[...] + 0.5
    report = run((torch_model, wrong), lambda p: torch.optim.SGD(p, lr=LR), optax.sgd(LR))
    assert report.first_step == 0 and report.first_divergence == "step 0: fc.bias"
    assert report.diagnosis[0].startswith("the weights differ before training (1 tensors, first fc.bias)")
    assert not any("lr*wd" in line or "learning rates" in line for line in report.diagnosis)


# ------------------------------------------------------------------------------------- a user's own model
class TorchNet(torch.nn.Module):
    """What a user might write: conv-BN-ReLU, a stride-2 conv, global average pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean(dim=(2, 3)))


class FlaxNet(nnx.Module):
    """Its twin from stock NNX layers, the BatchNorm given as ``batchnorm``."""

    def __init__(self, batchnorm, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, rngs=rngs)
        self.bn1 = batchnorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), rngs=rngs)
        self.fc = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        return self.fc(nnx.relu(self.conv2(x)).mean(axis=(1, 2)))


@pytest.mark.parametrize("stock", [False, True], ids=["layers.BatchNorm2d", "nnx.BatchNorm"])
def test_a_user_model_from_stock_layers(stock):
    """With flax_resnet.layers.BatchNorm2d it trains as torch does; with stock nnx.BatchNorm (torch's momentum and
    epsilon given) the running variance is the biased one, named at step 1 as a forward-pass difference."""
    from flax_resnet.layers import BatchNorm2d

    torch.manual_seed(0)
    batchnorm = (lambda n, rngs: nnx.BatchNorm(n, momentum=0.9, epsilon=1e-5, rngs=rngs)) if stock else BatchNorm2d
    report = parity.compare_training(TorchNet(), FlaxNet(batchnorm, rngs=nnx.Rngs(0)),
                                     lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2),
                                     optax.adamw(1e-3, weight_decay=1e-2), input_shape=(2, 3, 8, 8),
                                     port_weights=True)
    if not stock:
        assert_exact(report, (("exp_avg", "mu"), ("exp_avg_sq", "nu")))
        return
    assert report.first_divergence == "step 1: bn1.running_var", str(report)
    assert [row.name for row in report.failures if row.step == 1] == ["bn1.running_var"]
    assert report.diagnosis[0].startswith("step 1: the loss or running statistics differ before any update")
    # 2 images of 8x8: 128 values per channel at bn1, and Flax stores the biased variance
    assert any(line.startswith("bn1.running_var: running variance off by n/(n-1)") and "128/127" in line
               for line in report.diagnosis), report.diagnosis


# --------------------------------------------------------------------------------------------- the models
def test_both_models_are_left_exactly_as_they_were(pair):
    """Eval mode going in (so a train-mode step would have to switch it), weights, statistics, counters."""
    torch_model, flax_model = pair
    torch_model.eval()
    flax_model.eval()
    torch_before = {k: v.clone() for k, v in torch_model.state_dict().items()}
    flax_before = to_numpy_state_dict(flax_model)
    report = run(pair, lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, weight_decay=WD),
                 optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=0.9)))
    assert report.ok
    assert all(torch.equal(v, torch_before[k]) for k, v in torch_model.state_dict().items())
    assert all(np.array_equal(v, flax_before[k]) for k, v in to_numpy_state_dict(flax_model).items())
    assert all(v.dtype == torch.float32 for v in torch_model.parameters())
    assert not any(m.training for m in torch_model.modules())
    assert all(m.use_running_average for _, m in nnx.iter_modules(flax_model) if isinstance(m, nnx.BatchNorm))
    torch_model.train()
    flax_model.train()


def test_usage_errors(pair):
    sgd = torch.optim.SGD(pair[0].parameters(), lr=LR)
    with pytest.raises(TypeError, match="function from parameters"):
        parity.compare_training(*pair, sgd, optax.sgd(LR))
    with pytest.raises(ValueError, match="needs steps_per_epoch"):
        parity.compare_training(*pair, lambda p: torch.optim.SGD(p, lr=LR), optax.sgd(LR),
                                torch_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1))
    with pytest.raises(TypeError, match="GradientTransformation"):
        parity.compare_training(*pair, lambda p: torch.optim.SGD(p, lr=LR), lambda g: g)
