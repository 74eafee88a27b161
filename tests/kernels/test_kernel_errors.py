"""Every kernel entry point checks its inputs before it launches, on both backends, and raises a
:class:`KernelError` (a ``ShapeError`` here) whose message names the argument and what it needs.

The case that motivated it: ``row_grad`` with out-of-range rows read ~4e34 garbage on the
Triton path (an illegal memory access on a GPU) and raised a raw ``RuntimeError`` on the torch
path. After a refused call nothing was written (the optimizer's weights stay bit-identical).
"""
from __future__ import annotations

import pytest
import torch

from cca_fast.errors import KernelError as ReExported
from cca_fast.kernels.attribution import (LaunchPlan, Segment, TapSpec, component_scores, component_scores_reference,
                                          launch_component_scores, plan_launch, tap)
from cca_fast.kernels.errors import KernelError, ShapeError, StateError
from cca_fast.kernels.row_grad import RowSelectiveProjection, row_grad, row_grad_reference, row_selective, zero_delta
from cca_fast.kernels.sparse_optim import RowSparseOptimizer, RowSpec, SGDConfig, gather_rows, scatter_rows

BACKENDS = ("torch", "triton")


def test_kernel_error_is_one_family():
    assert ReExported is KernelError and issubclass(ShapeError, KernelError) and issubclass(KernelError, ValueError)


# ---- row_grad ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows, what", [([0, 7], "index 7, outside \\[0, 5\\)"), ([-1, 2], "index -1, outside"),
                                         ([[0, 1]], "1-D integer tensor")])
def test_row_grad_refuses_bad_rows(backend, rows, what):
    dy, x = torch.randn(6, 5), torch.randn(6, 3)
    with pytest.raises(ShapeError, match=f"rows .*{what}"):
        row_grad(dy, x, torch.tensor(rows), backend=backend)
    with pytest.raises(ShapeError, match=what):
        row_grad_reference(dy, x, torch.tensor(rows))


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_grad_refuses_bad_tensors(backend):
    dy, x, rows = torch.randn(6, 5), torch.randn(6, 3), torch.tensor([1, 2])
    cases = [
        ((dy, x[:4], rows), "same N"),
        ((dy, x.double(), rows), "share a dtype"),
        ((dy.long(), x.long(), rows), "dtype int64; the kernels take"),
        ((dy, x, rows.float()), "1-D integer tensor"),
        ((dy[0], x, rows), "dy must be 2-D"),
    ]
    for args, msg in cases:
        with pytest.raises(ShapeError, match=msg):
            row_grad(*args, backend=backend)
    with pytest.raises(ShapeError, match="out must be \\[2, 3\\] torch.float32"):
        row_grad(dy, x, rows, backend=backend, out=torch.empty(3, 3))
    # a good call still agrees with the reference (float32: a 6-term sum of O(1) products, 1e-5)
    torch.testing.assert_close(row_grad(dy, x, rows, backend=backend), row_grad_reference(dy, x, rows),
                               rtol=0, atol=1e-5)


def test_row_selective_refuses_rows_outside_the_weight():
    lin = torch.nn.Linear(4, 5)
    with pytest.raises(ShapeError, match="w_rows holds index 5, outside \\[0, 5\\)"):
        with row_selective(lin, torch.tensor([1, 5]), None, zero_delta((2, 4), torch.float32, "cpu"), None,
                           transposed=False):
            pass
    with pytest.raises(ShapeError, match="b_rows holds index 9"):
        with row_selective(lin, torch.tensor([1]), torch.tensor([9]), zero_delta((1, 4), torch.float32, "cpu"),
                           zero_delta((1,), torch.float32, "cpu"), transposed=False):
            pass
    with pytest.raises(ShapeError, match="delta_b must be \\[1\\]"):
        with row_selective(lin, torch.tensor([1]), torch.tensor([2]), zero_delta((1, 4), torch.float32, "cpu"),
                           zero_delta((3,), torch.float32, "cpu"), transposed=False):
            pass
    assert "forward" not in lin.__dict__  # nothing patched by a refused call
    x = torch.randn(2, 4)
    with pytest.raises(ShapeError, match="w_rows holds index 8"):
        RowSelectiveProjection.apply(x, lin.weight, lin.bias, torch.tensor([8]), None,
                                     zero_delta((1, 4), torch.float32, "cpu"), None, False, "torch")
    with pytest.raises(ShapeError, match="x has 3 features but the weight takes 4"):
        RowSelectiveProjection.apply(torch.randn(2, 3), lin.weight, lin.bias, torch.tensor([1]), None,
                                     zero_delta((1, 4), torch.float32, "cpu"), None, False, "torch")


def test_index_check_is_cached_per_tensor_version():
    from cca_fast.kernels import checks

    idx = torch.tensor([0, 3])
    checks.index("i", idx, 4)
    idx[1] = 9  # an in-place change bumps the version: checked again
    with pytest.raises(ShapeError, match="index 9"):
        checks.index("i", idx, 4)


# ---- component scores and the tap -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_component_scores_refuses_bad_inputs(backend):
    a, g = torch.randn(5, 12), torch.randn(5, 12)
    cases = [
        ((a, g[:, :6], 3, 4), {}, "same shape"),
        ((a, g, 5, 4), {}, "12 channels but n_comp \\* width = 5 \\* 4"),
        ((a, g, 0, 4), {}, "n_comp must be an integer >= 1"),
        ((a.long(), g.long(), 3, 4), {}, "act has dtype int64"),
        ((a, g, 3, 4), {"weights": torch.ones(4)}, "weights must be \\[N\\] = \\[5\\]"),
        ((a[0], g[0], 3, 4), {}, "act must be 2-D"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ShapeError, match=msg):
            component_scores(*args, backend=backend, **kw)
        with pytest.raises(ShapeError, match=msg):
            component_scores_reference(*args, **kw)


def test_launcher_refuses_a_wrong_output():
    a, g = torch.randn(5, 12), torch.randn(5, 12)
    plan = plan_launch(5, 3, 4, True, a.device)
    with pytest.raises(ShapeError, match="out must be a contiguous \\[5, 3\\]"):
        launch_component_scores(a, g, None, torch.empty(4, 3), 3, 4, plan, per_row=True)
    with pytest.raises(ShapeError, match="accumulation dtype"):
        launch_component_scores(a, g, None, torch.empty(5, 3, dtype=torch.float64), 3, 4, plan, per_row=True)
    assert isinstance(plan, LaunchPlan)


def test_tap_refuses_rows_and_segments_outside_the_activation():
    x = torch.randn(2, 3, 8, requires_grad=True)
    sink = lambda i, s: None  # noqa: E731
    bad = [
        (TapSpec(None, None, [Segment(4, 2, 4)], sink), "segments\\[0\\] covers channels \\[4, 12\\)"),
        (TapSpec((torch.tensor([0, 2]), torch.tensor([1, 1])), None, [Segment(0, 2, 4)], sink),
         "rows\\[0\\] \\(batch index\\) holds index 2"),
        (TapSpec((torch.tensor([0]), torch.tensor([3])), None, [Segment(0, 2, 4)], sink),
         "rows\\[1\\] \\(position index\\) holds index 3"),
        (TapSpec((torch.tensor([0]), torch.tensor([1])), torch.ones(2), [Segment(0, 2, 4)], sink),
         "weights must be \\[1\\]"),
        (TapSpec(None, None, [], sink), "segments is empty"),
    ]
    for spec, msg in bad:
        with pytest.raises(ShapeError, match=msg):
            tap(x, spec)


# ---- the row-sparse optimizer ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_refuses_bad_rows_and_leaves_weights_untouched(backend):
    w = torch.randn(4, 3)
    before = w.clone()
    for index, msg in ((torch.tensor([0, 4]), "index 4, outside \\[0, 4\\)"), (torch.tensor([1, 1]), "twice"),
                       (torch.tensor([0.0]), "1-D LongTensor")):
        with pytest.raises(ShapeError, match=msg):
            RowSparseOptimizer([RowSpec("w", w, 0, index)], SGDConfig(lr=0.1), backend=backend)
    with pytest.raises(ShapeError, match="w has dtype int64"):
        RowSparseOptimizer([RowSpec("w", w.long(), 0, torch.tensor([0]))], SGDConfig(lr=0.1), backend=backend)
    assert torch.equal(w, before)
    opt = RowSparseOptimizer([RowSpec("w", w, 0, torch.tensor([1]))], SGDConfig(lr=0.1), backend=backend)
    with pytest.raises(StateError, match="no parameter 'v'; it updates w"):
        opt.grad_view("v")
    opt.groups[0].params[0].param = torch.randn(4, 3, dtype=torch.float64)  # swapped behind its back
    with pytest.raises(StateError, match="w changed since the optimizer was built"):
        opt.step()
    assert torch.equal(w, before)


def test_gather_and_scatter_rows_check_indices_and_shapes():
    w = torch.randn(4, 3)
    with pytest.raises(ShapeError, match="index 6, outside \\[0, 4\\)"):
        gather_rows(w, 0, torch.tensor([6]))
    with pytest.raises(ShapeError, match="index 3, outside \\[0, 3\\)"):
        gather_rows(w, 1, torch.tensor([3]))
    with pytest.raises(ShapeError, match="packed shape \\[2, 3\\]"):
        scatter_rows(w, 0, torch.tensor([0, 1]), torch.zeros(2, 4))
    before = w.clone()
    with pytest.raises(ShapeError):
        scatter_rows(w, 0, torch.tensor([0, 9]), torch.zeros(2, 3))
    assert torch.equal(w, before)
