"""The epoch plan's augmentation against its definition, the notebooks' ``RandomCrop(32, padding=4)`` and
``RandomHorizontalFlip()``. Both frameworks apply the same plan, so the parity tests cannot see a plan that is
wrong for both; these tests hold it to torchvision's definition instead:

- RandomCrop pads 4 zero pixels on every side (40 x 40) and draws the crop's top-left corner (row, column)
  uniformly from ``randint(0, 40 - 32 + 1)``, i.e. each of 0..8 inclusive, independently: 81 equally likely
  offsets. RandomHorizontalFlip mirrors the columns with probability 1/2, independently of the crop.
- The crop itself, as the Flax runner applies it on the device (``runners.gather_uint8``, jitted as in the train
  step) and as the torch reference applies it (``torch_ref.data.gather``), is the zero-padded image sliced at
  those offsets, then mirrored: exactly, byte for byte.

The frequency tests are chi-square goodness-of-fit tests on one large plan with a fixed seed, so they are
deterministic. Threshold p > 1e-4: a correct sampler would fail it for one seed in 10,000 (a new NumPy stream
or a change of seed will not plausibly break it), while the faults it is there for are far beyond it: offsets
drawn from [0, 8) leave 17 of the 81 cells empty (p = 0 to machine precision). At this size (2,000 expected
draws per offset) the test also catches, 9 times in 10, one offset 20% more or less likely than 1/81, and a flip
probability of 0.507 instead of 0.5 (non-central chi-square power at the threshold).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import stats

from flax_resnet.data import plan

SIDE = 32  # CIFAR-10 images; the crop size of RandomCrop(32, padding=4)
PAD = 4
OFFSETS = 2 * PAD + 1  # 9 possible offsets per axis: 0..8 inclusive
N = 81 * 2000  # 2,000 expected draws per offset cell (162,000 positions: one plan, a few milliseconds)
P_MIN = 1e-4


@pytest.fixture(scope="module")
def big_plan() -> plan.EpochPlan:
    return plan.epoch_plan(seed=12345, epoch=7, num_examples=N)


def test_padding_is_the_notebooks():
    assert plan.CROP_PADDING == PAD


def test_every_crop_offset_occurs_uniformly(big_plan):
    """All 9 x 9 offsets occur, each with probability 1/81 (joint goodness of fit, 80 degrees of freedom):
    uniform joint cells also mean rows and columns are independent."""
    rows, cols = big_plan.offsets[:, 0].astype(np.int64), big_plan.offsets[:, 1].astype(np.int64)
    assert rows.min() >= 0 and cols.min() >= 0, "negative crop offsets"
    assert rows.max() < OFFSETS and cols.max() < OFFSETS, "crop offsets beyond 2 * padding"
    counts = np.bincount(rows * OFFSETS + cols, minlength=OFFSETS * OFFSETS)
    missing = [divmod(int(i), OFFSETS) for i in np.flatnonzero(counts == 0)]
    assert not missing, f"crop offsets (row, column) never drawn: {missing}"
    p = stats.chisquare(counts).pvalue
    assert p > P_MIN, f"crop offsets are not uniform over 0..{OFFSETS - 1} x 0..{OFFSETS - 1}: chi-square p = {p:.3g}"


def test_flips_occur_half_the_time_independently_of_the_crop(big_plan):
    """Both flips occur, each with probability 1/2 (1 degree of freedom), and independently of the offset
    (an 81 x 2 contingency table, 80 degrees of freedom)."""
    flips = big_plan.flips.astype(np.int64)
    counts = np.bincount(flips, minlength=2)
    assert counts.min() > 0, f"one flip state never occurs: {counts.tolist()}"
    p = stats.chisquare(counts).pvalue
    assert p > P_MIN, f"flips are not 1/2: {counts.tolist()}, chi-square p = {p:.3g}"
    cell = big_plan.offsets[:, 0].astype(np.int64) * OFFSETS + big_plan.offsets[:, 1]
    table = np.zeros((OFFSETS * OFFSETS, 2), np.int64)
    np.add.at(table, (cell, flips), 1)
    table = table[table.sum(axis=1) > 0]  # offsets never drawn fail the test above, not this one
    p = stats.chi2_contingency(table).pvalue
    assert p > P_MIN, f"flips depend on the crop offset: chi-square p = {p:.3g}"


def _by_definition(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """RandomCrop(32, padding=4) then RandomHorizontalFlip, written from their definition on uint8 NHWC."""
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))  # zeros
    out = np.stack([padded[i, r:r + SIDE, c:c + SIDE] for i, (r, c) in enumerate(offsets)])
    return np.where(flips[:, None, None, None], out[:, :, ::-1], out)


def test_cropped_batches_are_the_padded_images_sliced_at_the_offsets():
    """Both frameworks' crops of a batch, at the four corners, the centre and plan-drawn offsets, flipped and not,
    equal the definition byte for byte. Pixels are 1..255, so a missing or misplaced zero border shows."""
    import torch

    from flax_resnet.training.runners import DeviceData, gather_uint8
    from torch_ref.data import gather

    corners = [(0, 0), (0, 8), (8, 0), (8, 8), (4, 4), (0, 5), (7, 2)]
    drawn = plan.epoch_plan(seed=3, epoch=0, num_examples=9)
    offsets = np.concatenate([np.repeat(np.asarray(corners, np.int32), 2, axis=0), drawn.offsets])
    flips = np.concatenate([np.tile([False, True], len(corners)), drawn.flips])
    n = len(flips)
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(n, SIDE, SIDE, 3), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int32)
    permutation = rng.permutation(n).astype(np.int32)
    # position j of the plan holds image permutation[j], cropped at offsets[j] and flipped by flips[j]
    want = _by_definition(images[permutation], offsets, flips)

    batch_plan = plan.EpochPlan(permutation, offsets, flips)
    gather_flax = jax.jit(gather_uint8, static_argnums=(3, 4))  # as the train step traces it
    data = DeviceData(jax.numpy.asarray(images), jax.numpy.asarray(labels))
    flax_x, flax_y = gather_flax(data, jax.device_put(batch_plan), 0, n, True)
    torch_x, torch_y = gather(torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(permutation),
                              torch.from_numpy(offsets.astype(np.int64)), torch.from_numpy(flips), 0, n)
    np.testing.assert_array_equal(np.asarray(flax_y), permutation)
    np.testing.assert_array_equal(torch_y.numpy(), permutation)
    np.testing.assert_array_equal(np.asarray(flax_x), want, err_msg="the Flax runner's crop + flip")
    np.testing.assert_array_equal(torch_x.numpy(), want, err_msg="torch_ref's crop + flip")
    assert (want == 0).any() and want[flips].shape[0] > 0  # the zero border and the flips were exercised
