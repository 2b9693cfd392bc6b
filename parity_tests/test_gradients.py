"""Same gradients: d(cross-entropy)/d(every parameter) in float64, torch's loss.backward() vs nnx.value_and_grad."""

from __future__ import annotations

import pytest

from parity_tests.helpers import (
    CASE_PARAMS,
    F64_TOL,
    GRAD_TOL,
    flax_loss_and_grads,
    ported_pair,
    random_input,
    rel_err,
    torch_loss_and_grads,
)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_gradients_match(case):
    """Every parameter's gradient within 1e-10 relative error (float64), in train mode (BatchNorm on batch
    statistics; the dropout ablation in eval mode, as its masks cannot match). Blocks' logits are their
    average-pooled feature maps. Also the loss (1e-12) and the set of parameter names."""
    t, f = ported_pair(case, dtype="float64")
    if case.dropout:
        t.eval()
        f.eval()
    else:
        t.train()
        f.train()
    x = random_input(case, seed=3)
    loss_t, grads_t = torch_loss_and_grads(t, x)
    loss_f, grads_f = flax_loss_and_grads(f, x)
    assert abs(loss_f - loss_t) <= F64_TOL * abs(loss_t)
    assert sorted(grads_f) == sorted(grads_t)  # a set: nnx.clone (in the helper) sorts attribute order
    errors = {name: rel_err(grads_f[name], grads_t[name]) for name in grads_t}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_TOL, f"{worst}: relative error {errors[worst]:.3g} > {GRAD_TOL:g}"
