"""Row-sparse SGD / AdamW (Triton kernel under the interpreter, and the PyTorch path) against
``torch.optim`` run on the gathered rows.

Set-up: a Linear-style weight ``[13, 37]`` (rows along dim 0, a run of adjacent rows and isolated
ones), its bias ``[13]``, a Conv1D-style weight ``[37, 11]`` (columns along dim 1, strided) and a
1-D parameter, with fresh random gradients each step for 20 steps.

Tolerances (stated per dtype):
* float64: the kernel and torch.optim do the same float64 operations, up to the order of a few
  (e.g. ``lerp``): 1e-13 absolute on weights of magnitude ~1 after 20 steps.
* float32: the same with float32 rounding (u = 6e-8), 20 steps of a handful of ops: 2e-6.
* fp16 / bf16 with master weights: both sides keep fp32 master rows that agree to ~1e-7 and round
  them once to the weight dtype, so they agree to within one unit in the last place of the half
  type (relative 2^-10 for fp16, 2^-7 for bf16).
Rows outside the selection must be bit-identical (``torch.equal``) in every case.
"""
from __future__ import annotations

import pytest
import torch

import cca_fast.kernels.sparse_optim as so
from cca_fast.kernels.sparse_optim import (AdamWConfig, RowSparseOptimizer, RowSpec, SGDConfig, build_chunk_table,
                                           gather_rows)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton compiled on CUDA, interpreted on CPU
STEPS = 20
SEL = {  # name: (shape, dim, selected rows)
    "lin.weight": ((13, 37), 0, [0, 1, 2, 7, 12]),
    "lin.bias": ((13,), 0, [0, 1, 2, 7, 12]),
    "conv.weight": ((37, 11), 1, [0, 3, 4, 10]),
    "norm": ((9,), 0, [4]),
}
CONFIGS = {
    "sgd": SGDConfig(lr=0.05),
    "sgd_momentum_wd": SGDConfig(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
    "sgd_nesterov": SGDConfig(lr=0.05, momentum=0.8, nesterov=True),
    "adamw": AdamWConfig(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05),
}
TOL = {torch.float64: dict(rtol=0, atol=1e-13), torch.float32: dict(rtol=0, atol=2e-6),
       torch.float16: dict(rtol=2.0 ** -10, atol=1e-6), torch.bfloat16: dict(rtol=2.0 ** -7, atol=1e-6)}


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE))
            for n, (shape, _, _) in SEL.items()}


def _torch_optim(leaves, cfg):
    if isinstance(cfg, AdamWConfig):
        return torch.optim.AdamW(leaves, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 foreach=False)
    return torch.optim.SGD(leaves, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov, foreach=False)


def _complement(shape, dim, rows):
    keep = torch.ones(shape[dim], dtype=torch.bool)
    keep[rows] = False
    return keep.nonzero().flatten().to(DEVICE)


def _run(dtype, cfg, backend, block=64, seed=0):
    params = _params(dtype, seed)
    base = {n: p.detach().clone() for n, p in params.items()}
    specs = [RowSpec(n, params[n], dim, torch.tensor(rows, device=DEVICE)) for n, (_, dim, rows) in SEL.items()]
    opt = RowSparseOptimizer(specs, cfg, backend=backend, block=block)
    # reference: torch.optim on the gathered rows (fp32 master rows for half dtypes, else the dtype)
    ref_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    leaves = {n: gather_rows(base[n], dim, torch.tensor(rows, device=DEVICE)).to(ref_dtype).requires_grad_()
              for n, (_, dim, rows) in SEL.items()}
    ref = _torch_optim(list(leaves.values()), cfg)
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(STEPS):
        opt.zero_grad()
        for n in SEL:
            grad = torch.randn(opt.grad_view(n).shape, generator=g, dtype=torch.float64).to(DEVICE)
            opt.grad_view(n).copy_(grad)
            leaves[n].grad = grad.to(ref_dtype)
        opt.step()
        ref.step()
    return params, base, leaves, opt


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_selected_rows_match_torch_optim_and_others_bit_identical(dtype, name, backend):
    cfg = CONFIGS[name]
    params, base, leaves, opt = _run(dtype, cfg, backend)
    for n, (shape, dim, rows) in SEL.items():
        idx = torch.tensor(rows, device=DEVICE)
        got = gather_rows(params[n], dim, idx)
        if dtype in (torch.float16, torch.bfloat16):  # weights = master rows rounded to nearest even
            assert torch.equal(got, opt.state_view(n, "master").to(dtype)), n
        assert not torch.equal(got, gather_rows(base[n], dim, idx)), "selected rows did not change"
        torch.testing.assert_close(got.double(), leaves[n].detach().to(dtype).double(), **TOL[dtype], msg=f"{n}")
        other = _complement(shape, dim, rows)
        assert torch.equal(params[n].detach().index_select(dim, other), base[n].index_select(dim, other)), n


@pytest.mark.parametrize("block", [4, 16, 64])
def test_chunking_covers_every_selected_element_once(block):
    """Each selected element is addressed by exactly one (chunk, lane); no other element is."""
    params = _params(torch.float32)
    specs = [RowSpec(n, params[n], dim, torch.tensor(rows)) for n, (_, dim, rows) in SEL.items()]
    opt = RowSparseOptimizer(specs, SGDConfig(), block=block)
    grp = opt.groups[0]
    table = build_chunk_table(grp.params, grp.anchor, block)
    item = grp.anchor.element_size()
    got, packed = [], []
    for p_off, stride, n, k in table.tolist():
        assert 0 < n <= block
        got += [grp.anchor.data_ptr() + (p_off + j * stride) * item for j in range(n)]
        packed += list(range(k, k + n))
    expect = []
    for pp in grp.params:
        rows = pp.index.tolist()
        if pp.param.dim() == 1:
            expect += [pp.param.data_ptr() + r * item for r in rows]
        elif pp.dim == 0:
            expect += [pp.param.data_ptr() + (r * pp.param.stride(0) + c) * item for r in rows for c in range(pp.shape[1])]
        else:
            expect += [pp.param.data_ptr() + (c * pp.param.stride(0) + r) * item for r in rows for c in range(pp.shape[1])]
    assert got == expect  # packed order = row-major [R, C] per parameter, parameters in order
    assert packed == list(range(grp.numel))


def test_state_size_equals_selected_rows_times_columns():
    n_sel = sum(len(rows) * (shape[1 - dim] if len(shape) == 2 else 1) for shape, dim, rows in SEL.values())
    for dtype, master in [(torch.float32, 0), (torch.float16, n_sel), (torch.bfloat16, n_sel)]:
        params = _params(dtype)
        specs = [RowSpec(n, params[n], dim, torch.tensor(rows)) for n, (_, dim, rows) in SEL.items()]
        adam = RowSparseOptimizer(specs, AdamWConfig())
        assert adam.state_numel() == {"grad": n_sel, "master": master, "exp_avg": n_sel, "exp_avg_sq": n_sel}
        assert adam.state_bytes() == 4 * (3 * n_sel + master)
        sgd = RowSparseOptimizer(specs, SGDConfig(momentum=0.9))
        assert sgd.state_numel() == {"grad": n_sel, "master": master, "momentum_buffer": n_sel}
        assert RowSparseOptimizer(specs, SGDConfig()).state_numel() == {"grad": n_sel, "master": master}


def test_one_launch_per_step_for_all_parameters(monkeypatch):
    calls = []
    get_kernel = so._sparse_adamw_kernel

    class Counting:
        def __getitem__(self, grid):
            calls.append(grid)
            return get_kernel()[grid]

    monkeypatch.setattr(so, "_sparse_adamw_kernel", lambda: Counting())
    params = _params(torch.float32)
    specs = [RowSpec(n, params[n], dim, torch.tensor(rows)) for n, (_, dim, rows) in SEL.items()]
    opt = RowSparseOptimizer(specs, AdamWConfig(), backend="triton", block=8)
    for _ in range(3):
        opt.step()
    assert len(calls) == 3 and calls[0][0] == opt.groups[0].table().shape[0]


def test_half_without_master_weights_matches_half_sgd():
    """``master_weights=False`` steps the fp16 weights directly, as an fp16 ``torch.optim.SGD``
    does. With a learning rate exact in fp16 (2^-4; torch on CPU rounds ``alpha`` to the tensor
    dtype, the kernel keeps it in fp32) both compute ``w - lr * g`` exactly in fp32 from the same
    fp16 values and round once to fp16: bit-identical."""
    lr = 2.0 ** -4
    params = _params(torch.float16)
    specs = [RowSpec(n, params[n], dim, torch.tensor(rows)) for n, (_, dim, rows) in SEL.items()]
    opt = RowSparseOptimizer(specs, SGDConfig(lr=lr), master_weights=False, backend="triton", block=32)
    assert opt.state_numel()["master"] == 0
    leaves = {n: gather_rows(params[n], dim, torch.tensor(rows)).requires_grad_() for n, (_, dim, rows) in SEL.items()}
    ref = torch.optim.SGD(list(leaves.values()), lr=lr, foreach=False)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        for n in SEL:
            grad = torch.randn(opt.grad_view(n).shape, generator=g).half().to(DEVICE)
            opt.grad_view(n).copy_(grad.float())
            leaves[n].grad = grad
        opt.step()
        ref.step()
    for n, (_, dim, rows) in SEL.items():
        assert torch.equal(gather_rows(params[n], dim, torch.tensor(rows)), leaves[n].detach()), n


def test_mixed_dtypes_form_groups_and_moved_parameters_are_followed():
    a = torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64, device=DEVICE))
    b = torch.nn.Parameter(torch.randn(7, 3, dtype=torch.float32, device=DEVICE))
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = RowSparseOptimizer([RowSpec("a", a, 0, torch.tensor([1, 4])), RowSpec("b", b, 0, torch.tensor([6]))],
                             SGDConfig(lr=0.5), backend="triton", block=4)
    assert len(opt.groups) == 2
    opt.grad_view("a").fill_(1.0)
    opt.grad_view("b").fill_(2.0)
    opt.step()
    b.data = b.data.clone()  # new storage: the chunk table must be rebuilt, not write to the old one
    opt.step()
    expect_a, expect_b = a0.clone(), b0.clone()
    for _ in range(2):  # two steps: lr 0.5 x grad 1 (a), lr 0.5 x grad 2 (b), same fp ops as the kernel
        expect_a[[1, 4]] -= 0.5
        expect_b[6] -= 1.0
    assert torch.equal(a.detach(), expect_a) and torch.equal(b.detach(), expect_b)


def test_invalid_specs_are_rejected():
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="unique"):
        RowSparseOptimizer([RowSpec("p", p, 0, torch.tensor([1, 1]))], SGDConfig())
    with pytest.raises(ValueError, match="unique"):
        RowSparseOptimizer([RowSpec("p", p, 0, torch.tensor([4]))], SGDConfig())
    with pytest.raises(ValueError, match="twice"):
        RowSparseOptimizer([RowSpec("p", p, 0, torch.tensor([1])), RowSpec("p", p, 0, torch.tensor([2]))], SGDConfig())
    with pytest.raises(ValueError, match="power of two"):
        RowSparseOptimizer([RowSpec("p", p, 0, torch.tensor([1]))], SGDConfig(), block=12)
    with pytest.raises(ValueError):
        AdamWConfig(betas=(1.0, 0.9))
    with pytest.raises(ValueError):
        SGDConfig(nesterov=True)


@pytest.mark.parametrize("cfg", [CONFIGS["sgd_momentum_wd"], CONFIGS["adamw"]])
def test_contiguous_aligned_fast_path(cfg):
    """Rows 32 wide (offsets multiples of 16, unit stride): the kernel's vectorisation hints are
    on, and it agrees with the PyTorch path (fp32, the same formulas up to operation order:
    1e-6 absolute on weights ~1 after 20 steps)."""
    out = []
    for backend in ("triton", "torch"):
        w = torch.nn.Parameter(torch.randn(10, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE))
        opt = RowSparseOptimizer([RowSpec("w", w, 0, torch.tensor([1, 2, 5, 9]))], cfg, backend=backend, block=32)
        if backend == "triton":
            opt.groups[0].table()
            assert opt.groups[0].unit_stride and opt.groups[0].aligned
        g = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            opt.grad_view("w").copy_(torch.randn(4, 32, generator=g))
            opt.step()
        out.append(w.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-6)


_COMPILE_SCRIPT = r'''
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import cca_fast.kernels.sparse_optim as so

def ptx(kernel, sig, consts, n_ptr):
    names = list(kernel.arg_names)
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in range(n_ptr)})  # as the JIT specialises
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]

out = {}
for dt in ("bf16", "fp32"):
    for unit in (True, False):
        flags = {"HAS_MASTER": dt != "fp32", "RTNE_BF16": False, "UNIT_STRIDE": unit, "ALIGNED": unit, "BLOCK": 1024}
        sig = {"anchor_ptr": "*" + dt, "table_ptr": "*i64", "grad_ptr": "*fp32", "master_ptr": "*fp32",
               "m_ptr": "*fp32", "v_ptr": "*fp32", "hp_ptr": "*fp32", **{k: "constexpr" for k in flags}}
        out["adamw_%s_%s" % (dt, unit)] = ptx(so._sparse_adamw_kernel(), sig, flags, 7).count("ld.global.v4")
        flags = {"HAS_MASTER": dt != "fp32", "HAS_MOMENTUM": True, "NESTEROV": True, "RTNE_BF16": False,
                 "UNIT_STRIDE": unit, "ALIGNED": unit, "BLOCK": 1024}
        sig = {"anchor_ptr": "*" + dt, "table_ptr": "*i64", "grad_ptr": "*fp32", "master_ptr": "*fp32",
               "buf_ptr": "*fp32", "hp_ptr": "*fp32", **{k: "constexpr" for k in flags}}
        out["sgd_%s_%s" % (dt, unit)] = ptx(so._sparse_sgd_kernel(), sig, flags, 6).count("ld.global.v4")
print(json.dumps(out))
'''


def test_kernels_compile_for_cuda_with_vector_accesses():
    """Compiled (not interpreted) for sm_90 PTX without a GPU: catches what the interpreter
    cannot, and checks that contiguous, 16-aligned chunks get 16-byte vector loads. In a
    subprocess with ``TRITON_INTERPRET`` unset (kernels are decorated per setting)."""
    from helpers import compile_counts

    counts = compile_counts(_COMPILE_SCRIPT)
    for key, n in counts.items():
        if key.endswith("True"):
            assert n > 0, counts


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_step_bumps_the_autograd_version_counters(backend):
    """The Triton kernels write weights through raw pointers; the step still bumps each updated
    parameter's version counter (what cca_fast.generation.prefix keys its validity on)."""
    w, b = torch.randn(10, 6, device=DEVICE), torch.randn(7, device=DEVICE)
    opt = RowSparseOptimizer([RowSpec("w", w, 0, torch.tensor([2, 5], device=DEVICE)),
                              RowSpec("b", b, 0, torch.tensor([1], device=DEVICE))], SGDConfig(lr=0.1),
                             backend=backend, block=8)
    before = (w._version, b._version)
    opt.zero_grad()
    opt.grad_view("w").fill_(1.0)
    opt.grad_view("b").fill_(1.0)
    opt.step()
    assert w._version > before[0] and b._version > before[1]
