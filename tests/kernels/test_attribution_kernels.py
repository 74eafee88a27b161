"""Attribution kernel (``cca_fast.kernels.attribution``): Triton (interpreted on CPU, compiled on
CUDA) and the PyTorch reference against float64, plus dispatch and the backward tap.

Tolerances. Each output is a sum of ``m`` products ``a*g`` (``m = w`` per row, ``m = N*w`` summed
over rows), accumulated in fp32 (fp64 for fp64 inputs; unit roundoff ``u``). Products of
fp16/bf16 inputs are exact in fp32; fp32 and fp64 products round once. The kernel sums a tile
as a tree and tiles sequentially, so its error is ``O((log2(tile) + tiles) u) * sum|a g|``; we
allow ``4 * sqrt(m) * u * sum|w a g| + tiny``, far above that (>= 20 u for every shape here)
yet below the effect of dropping a single term (``~ sum|a g| / m``), so a masking bug fails.
The float64 reference is computed from the *same* rounded inputs, so input rounding is not
part of the error.
"""
from __future__ import annotations

import math

import pytest
import torch

from cca_fast.kernels import dispatch
from cca_fast.kernels.attribution import (AttributionTap, Segment, TapSpec, component_scores,
                                          component_scores_reference, launch_component_scores, plan_launch)
from cca_fast.kernels.errors import BackendUnavailable, KernelError

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -24, torch.bfloat16: 2.0 ** -24}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (N rows, n components, width): odd sizes so that every block has a partly masked edge:
# n=5 < BLOCK_K=8; w=6 -> BLOCK_W=8; w=96 -> BLOCK_W=128; 300 neurons -> two 256-wide blocks;
# 70 rows of heads -> BLOCK_R=16, last row block 6/16 full.
SHAPES = [(1, 1, 1), (7, 5, 6), (37, 300, 1), (13, 3, 96), (70, 2, 128)]


# Triton reads TRITON_INTERPRET when it is imported: tests/conftest.py sets it on CPU machines
needs_triton = pytest.mark.skipif(
    not dispatch.triton_available() or (DEVICE == "cpu" and not dispatch.interpret_mode()),
    reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 set before Python starts (tests/conftest.py)")


def _inputs(N, n, w, dtype, seed, weights=True):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(N, n * w, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    gr = torch.randn(N, n * w, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    wt = (torch.rand(N, generator=g, dtype=torch.float64) * 2 - 0.5).to(DEVICE) if weights else None
    return a, gr, wt


def _check(got, a, g, n, w, weights, absolute, per_row):
    """``got`` against the float64 reference with the error bound of the module docstring."""
    a64, g64 = a.double().cpu(), g.double().cpu()
    w64 = weights.double().cpu() if weights is not None else None
    ref = component_scores_reference(a64, g64, n, w, w64, absolute=absolute, per_row=per_row)
    mag = (a64 * g64).abs().view(a.shape[0], n, w).sum(-1)
    if w64 is not None:
        mag = mag * w64.abs()[:, None]
    terms = w if per_row else a.shape[0] * w
    if not per_row:
        mag = mag.sum(0)
    bound = 4 * math.sqrt(terms) * UNIT[a.dtype] * mag + 1e-300
    got = got.cpu()
    assert got.shape == ref.shape
    assert torch.isfinite(got).all()
    err = (got.double() - ref).abs()
    assert (err <= bound).all(), f"max err {err.max():.3e} vs bound {bound.flatten()[err.argmax()]:.3e}"


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_float64_reference(dtype, shape):
    N, n, w = shape
    a, g, wt = _inputs(N, n, w, dtype, seed=N * 7 + n)
    for per_row, absolute, weights in [(False, False, None), (False, True, wt), (True, False, wt), (True, True, None)]:
        got = component_scores(a, g, n, w, weights, absolute=absolute, per_row=per_row, backend="triton")
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        _check(got, a, g, n, w, weights, absolute, per_row)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_matches_float64_reference(dtype):
    a, g, wt = _inputs(23, 9, 6, dtype, seed=5)
    for per_row in (False, True):
        _check(component_scores(a, g, 9, 6, wt, per_row=per_row, backend="torch"), a, g, 9, 6, wt, False, per_row)


@needs_triton
@pytest.mark.parametrize("per_row", [False, True])
def test_poisoned_outputs_are_fully_overwritten(per_row):
    """Output pre-filled with NaN; a multi-program split (grid_r > 1) on the reduction path."""
    N, n, w = 200, 7, 6  # BLOCK_R = 64: 4 row blocks, the last one 8/64 full
    a, g, wt = _inputs(N, n, w, torch.float32, seed=11)
    plan = plan_launch(N, n, w, per_row, torch.device(DEVICE), programs=3)
    # reduction path: rows really split across programs (2 x 128 rows, each looping twice)
    assert per_row or (plan.grid_r == 2 and plan.rows_per_program == 128)
    rows = N if per_row else plan.grid_r
    out = torch.full((rows, n), float("nan"), dtype=torch.float32, device=DEVICE)
    launch_component_scores(a, g, wt, out, n, w, plan, absolute=False, per_row=per_row)
    assert torch.isfinite(out).all()
    _check(out if per_row else out.sum(0), a, g, n, w, wt, False, per_row)


@needs_triton
def test_strided_rows_and_column_offset():
    """A site's slice of a wider activation (row stride 50, channel offset 5), as taps pass it."""
    g_ = torch.Generator().manual_seed(3)
    big_a = torch.randn(19, 50, generator=g_, dtype=torch.float64).to(DEVICE)
    big_g = torch.randn(19, 50, generator=g_, dtype=torch.float64).to(DEVICE)
    a, g = big_a[:, 5:41], big_g[:, 5:41]  # 6 heads x 6
    _check(component_scores(a, g, 6, 6, backend="triton"), a, g, 6, 6, None, False, False)
    # a non-unit channel stride is copied first
    at, gt = big_a.t().contiguous().t()[:, 5:41], big_g[:, 5:41]
    _check(component_scores(at, gt, 6, 6, backend="triton"), at, gt, 6, 6, None, False, False)


@needs_triton
def test_zero_rows_give_zeros():
    a = torch.zeros(0, 12, device=DEVICE)
    assert torch.equal(component_scores(a, a, 3, 4, backend="triton").cpu(), torch.zeros(3))
    assert component_scores(a, a, 3, 4, per_row=True, backend="triton").shape == (0, 3)


def test_bad_inputs_raise_kernel_error():
    a = torch.zeros(4, 12)
    with pytest.raises(KernelError, match="n_comp"):
        component_scores(a, a, 5, 2)
    with pytest.raises(KernelError, match="same shape"):
        component_scores(a, a[:3], 3, 4)
    with pytest.raises(KernelError, match="dtype"):
        component_scores(a.long(), a.long(), 3, 4)
    with pytest.raises(KernelError, match="weights"):
        component_scores(a, a, 3, 4, torch.ones(5))


@pytest.mark.skipif(not dispatch.triton_available(), reason="triton not installed")
def test_dispatch_rules():
    assert dispatch.resolve_backend("cpu", None, interpret=True) == "triton"  # forced under the interpreter
    assert dispatch.resolve_backend("cpu", "torch", interpret=True) == "torch"
    assert dispatch.resolve_backend("cpu", None, interpret=False) == "torch"  # CPU users get PyTorch
    assert dispatch.resolve_backend("cpu", "auto", interpret=False) == "torch"
    assert dispatch.resolve_backend("cuda", None, interpret=False) == "triton"  # (no tensor is made)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        dispatch.resolve_backend("cpu", "triton", interpret=False)
    with pytest.raises(BackendUnavailable, match="unknown kernel backend"):
        dispatch.resolve_backend("cpu", "cuda")


@needs_triton
def test_tap_is_identity_and_scores_in_backward():
    """Forward and gradient pass through bit-identically; the sink receives the reference
    scores of the selected rows only, once per backward."""
    g_ = torch.Generator().manual_seed(8)
    x0 = torch.randn(3, 5, 20, generator=g_, dtype=torch.float64, device=DEVICE)
    up = torch.randn(3, 5, 20, generator=g_, dtype=torch.float64, device=DEVICE)
    rows = (torch.tensor([0, 1, 2, 2], device=DEVICE), torch.tensor([4, 4, 4, 1], device=DEVICE))
    got: dict[int, torch.Tensor] = {}
    segs = [Segment(2, 3, 4), Segment(14, 6, 1)]  # channels 2..14 (3 heads of 4), 14..20 (neurons)
    spec = TapSpec(rows, None, segs, lambda i, s: got.__setitem__(i, s), backend="triton")
    x = x0.clone().requires_grad_(True)
    y = AttributionTap.apply(x, spec)
    assert torch.equal(y, x0)
    (y * up).sum().backward()
    assert torch.equal(x.grad, up)
    for i, seg in enumerate(segs):
        a = x0[rows[0], rows[1], seg.start : seg.stop]
        gr = up[rows[0], rows[1], seg.start : seg.stop]
        _check(got[i], a, gr, seg.n, seg.width, None, False, False)


def test_tap_detects_in_place_change_of_saved_activation():
    """All rows scored: the activation is saved by reference, so an in-place edit afterwards
    must fail loudly instead of silently scoring the edited values."""
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    h = x * 1.0
    spec = TapSpec(None, None, [Segment(0, 2, 2)], lambda i, s: None, backend="torch")
    y = AttributionTap.apply(h, spec)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


def test_benchmark_script_runs_on_a_tiny_model(tmp_path):
    """The committed benchmark must keep working: run it on a 2-layer toy shape, check the
    files and that fused and caching scores agree (float32: 1e-4 relative)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "kernels" / "bench_attribution.py"
    spec = importlib.util.spec_from_file_location("bench_attribution", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shape = dict(hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=8, num_hidden_layers=2, vocab_size=64)
    bench.PRESETS["tiny"] = [{"workload": "model", "shape": shape, "bt": [(2, 5)]}]
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    threads = torch.get_num_threads()  # the script pins CPU threads; restore for later tests
    try:
        assert bench.main(["--device", DEVICE, "--preset", "tiny", "--dtype", "fp32", "--repeats", "1",
                           "--warmup", "0", "--out", str(out), "--md", str(md)]) == 0
    finally:
        torch.set_num_threads(threads)
    import json

    report = json.loads(out.read_text())
    row = report["results"][0]
    assert set(row["time_ms"]) == set(bench.METHODS) and all(v > 0 for v in row["peak_mib"].values())
    assert max(row["agreement_rel_err"].values()) < 1e-4
    assert "| model (2 layers) | 2 | 5 |" in md.read_text()


_COMPILE_SCRIPT = r'''
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import cca_fast.kernels.attribution as at

kernel = at._kernel()
names = list(kernel.arg_names)
out = {}
for dt in ("bf16", "fp16", "fp32", "fp64"):
    for per_row in (False, True):
        f64 = dt == "fp64"
        consts = {"HAS_WEIGHTS": True, "ABSOLUTE": False, "PER_ROW": per_row, "ACC_FP64": f64,
                  "BLOCK_R": 16, "BLOCK_K": 2, "BLOCK_W": 128}
        acc = "*fp64" if f64 else "*fp32"
        sig = {"A": "*" + dt, "G": "*" + dt, "W": acc, "OUT": acc,
               **{k: "i32" for k in ("n_rows", "n_comp", "width", "stride_a", "stride_g", "rows_per_program")},
               **{k: "constexpr" for k in consts}}
        src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                        attrs={(i,): [["tt.divisibility", 16]] for i in range(4)})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        out[f"{dt}_{per_row}"] = {"ld_global": ptx.count("ld.global"), "f64_ops": ptx.count(".f64"),
                                  "cvt_from_half": ptx.count("cvt.f32.bf16") + ptx.count("cvt.f32.f16")}
print(json.dumps(out))
'''


def test_kernel_compiles_for_cuda():
    """Compiled (not interpreted) for sm_90 PTX without a GPU, for every dtype, summed and per
    row (head_dim 128 tiles): fp16/bf16 inputs are converted to fp32 in registers, and only the
    float64 variant does float64 arithmetic. In a subprocess with ``TRITON_INTERPRET`` unset, as
    the row_grad and sparse optimizer PTX tests."""
    from helpers import compile_counts

    counts = compile_counts(_COMPILE_SCRIPT)
    assert len(counts) == 8
    for key, c in counts.items():
        dt = key.split("_")[0]
        assert c["ld_global"] > 0, (key, c)
        assert (c["f64_ops"] > 0) == (dt == "fp64"), (key, c)
        assert (c["cvt_from_half"] > 0) == (dt in ("bf16", "fp16")), (key, c)
