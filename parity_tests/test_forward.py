"""Same outputs: torch's random init ported into Flax computes torch's outputs, in train and in eval mode."""

from __future__ import annotations

import numpy as np
import pytest

import flax_resnet as fr
from parity_tests.helpers import (
    CASE_PARAMS,
    CASES_BY_ID,
    F64_TOL,
    assert_close,
    flax_forward,
    ported_pair,
    random_input,
    rel_err,
    state_arrays,
    torch_forward,
    train_forwards,
)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_outputs_match_in_train_and_eval_mode(case, dtype):
    """Three train-mode forwards (batch statistics; running statistics move), then eval mode (running
    statistics): every output, and after the train-mode forwards every BatchNorm's running_mean and
    running_var, within 1e-5 (float32; ResNet-50 5e-5, see its case) / 1e-12 (float64) relative error of
    torch's; every num_batches_tracked equal (3)."""
    tol = case.f32_tol if dtype == "float32" else F64_TOL
    t, f = ported_pair(case, dtype=dtype)
    np_dtype = np.float32 if dtype == "float32" else np.float64
    if not case.dropout:  # dropout masks come from different RNGs: train mode cannot match bit for bit
        for step, (out_t, out_f) in enumerate(train_forwards(t, f, case, steps=3, dtype=np_dtype)):
            assert_close(out_f, out_t, tol, f"train-mode forward {step}")
        _assert_running_stats_match(t, f, tol, steps=3)
    t.eval()
    f.eval()
    x = random_input(case, seed=1, dtype=np_dtype)
    out_t, out_f = torch_forward(t, x), flax_forward(f, x)
    assert out_f.dtype == out_t.dtype == np_dtype
    assert_close(out_f, out_t, tol, "eval-mode forward")


def _assert_running_stats_match(t, f, tol: float, steps: int) -> None:
    torch_state, flax_state = state_arrays(t.state_dict()), state_arrays(fr.to_torch_state_dict(f))
    assert sorted(torch_state) == sorted(flax_state)
    for key, value in torch_state.items():
        if key.endswith("num_batches_tracked"):
            assert int(flax_state[key]) == int(value) == steps, key
        elif key.endswith(("running_mean", "running_var")):
            assert_close(flax_state[key], value, tol, key)


def test_dropout_model_drops_in_train_mode_only():
    """The dropout ablation really drops when its dropout is in train mode, in both frameworks (BatchNorm
    held in eval mode, so dropout is the only difference), and eval mode is deterministic."""
    case = CASES_BY_ID["ResNet18Dropout"]
    t, f = ported_pair(case, dtype="float32", perturb=False)
    x = random_input(case, dtype=np.float32)
    t.eval()
    f.eval()
    eval_t, eval_f = torch_forward(t, x), flax_forward(f, x)
    assert np.array_equal(eval_f, flax_forward(f, x))
    t.dropout.train()
    f.dropout.deterministic = False
    assert rel_err(torch_forward(t, x), eval_t) > 1e-2
    assert rel_err(flax_forward(f, x), eval_f) > 1e-2
