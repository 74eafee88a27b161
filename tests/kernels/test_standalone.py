"""The kernels stand alone: ``kernels/`` imports nothing from ``cca_fast``, so it can be tested
and reused as a package of its own.

Two checks:

* static: no ``import`` statement anywhere in ``kernels/`` (module level or inside a function)
  names ``cca_fast``;
* dynamic: a child Python whose ``sys.path`` holds a temporary folder with a copy of ``kernels/``
  (under another name, ``kernels_alone``) plus the interpreter's own library folders (torch,
  triton) and *not* this repository, with ``import cca_fast`` blocked, imports the copy under
  ``TRITON_INTERPRET=1`` and runs each Triton kernel once against its PyTorch reference: the
  attribution scores, the row-selective gradient, row-sparse SGD (with momentum) and AdamW.

Tolerances in the child: every input is float64, so kernel and reference both accumulate in
float64 (unit roundoff u = 1.1e-16) and differ only in summation order. Each output is a sum of
at most 24 products of O(1) values (the optimizer: 3 steps of a few operations on O(1) values),
so the difference is below ~24 * 2 * u * 24 ~ 1e-13; ``atol=1e-12`` leaves margin yet is ten
orders of magnitude below the effect of any indexing or masking bug. Rows outside the optimizer's
selection must stay bit-identical.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"

_CHILD = textwrap.dedent(r'''
    import os
    import sys
    sys.modules["cca_fast"] = None  # any import of cca_fast (or a submodule) now raises ImportError

    import torch
    import kernels_alone
    from kernels_alone import dispatch
    from kernels_alone.attribution import component_scores, component_scores_reference
    from kernels_alone.errors import BackendUnavailable, KernelError, ShapeError
    from kernels_alone.row_grad import row_grad, row_grad_reference
    from kernels_alone.sparse_optim import AdamWConfig, RowSparseOptimizer, RowSpec, SGDConfig

    assert kernels_alone.__file__.startswith(sys.argv[1]), kernels_alone.__file__
    repo = sys.argv[2]
    assert repo not in [os.path.realpath(p or ".") for p in sys.path], sys.path  # the repository is not importable
    assert dispatch.interpret_mode() and dispatch.resolve_backend("cpu", None) == "triton"
    TOL = dict(rtol=0, atol=1e-12)  # float64 both sides, sums of <= 24 O(1) terms (module docstring)
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)

    # attribution: 9 rows, 3 heads of width 5, weighted, summed over rows and per row
    a, g, w = rand(9, 15), rand(9, 15), rand(9)
    for per_row in (False, True):
        got = component_scores(a, g, 3, 5, w, per_row=per_row, backend="triton")
        ref = component_scores_reference(a, g, 3, 5, w, per_row=per_row)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, ref, **TOL)

    # row-selective gradient: rows 1, 4, 6 of dY [24, 7]^T X [24, 10]
    dy, x, rows = rand(24, 7), rand(24, 10), torch.tensor([1, 4, 6])
    torch.testing.assert_close(row_grad(dy, x, rows, backend="triton"), row_grad_reference(dy, x, rows), **TOL)

    # row-sparse optimizers: the Triton step against the PyTorch step on the same rows
    for cfg in (SGDConfig(lr=0.1, momentum=0.9, weight_decay=0.01), AdamWConfig(lr=0.01)):
        base = rand(6, 8)
        out = {}
        for backend in ("triton", "torch"):
            p = base.clone()
            opt = RowSparseOptimizer([RowSpec("w", p, 0, torch.tensor([0, 2, 3]))], cfg, backend=backend, block=8)
            for step in range(3):
                opt.grad_view("w").copy_(torch.linspace(-1, 1, 24, dtype=torch.float64).view(3, 8) * (step + 1))
                opt.step()
            out[backend] = p
        torch.testing.assert_close(out["triton"], out["torch"], **TOL)
        untouched = torch.tensor([1, 4, 5])
        assert torch.equal(out["triton"][untouched], base[untouched])
        assert not torch.equal(out["triton"][0], base[0])

    # one error family, with actionable messages
    for call, kind in ((lambda: dispatch.resolve_backend("cpu", "cuda"), BackendUnavailable),
                       (lambda: row_grad(dy, x[:3], rows), ShapeError)):
        try:
            call()
        except kind as e:
            assert isinstance(e, KernelError) and isinstance(e, ValueError), type(e)
        else:
            raise AssertionError(f"expected {kind.__name__}")

    leaked = sorted(m for m, v in sys.modules.items() if m.startswith("cca_fast") and v is not None)
    assert not leaked, leaked
    print("standalone ok")
''')


def _imports(tree: ast.AST) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_no_kernel_module_imports_cca_fast():
    files = sorted(KERNELS.glob("*.py"))
    assert files
    for f in files:
        bad = [n for n in _imports(ast.parse(f.read_text(encoding="utf-8"))) if n.split(".")[0] == "cca_fast"]
        assert not bad, f"{f.name} imports {bad}"


def test_kernels_run_without_cca_fast(tmp_path):
    pytest.importorskip("triton")
    shutil.copytree(KERNELS, tmp_path / "kernels_alone", ignore=shutil.ignore_patterns("__pycache__"))
    script = tmp_path / "child.py"
    script.write_text(_CHILD, encoding="utf-8")
    # sys.path: the copy and the interpreter's own folders (stdlib, site-packages), not this
    # repository (-I drops PYTHONPATH, the user site and the current folder; the child checks)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["TRITON_INTERPRET"] = "1"
    repo = os.path.realpath(KERNELS.parent)
    code = (f"import sys, runpy; sys.path.insert(0, {str(tmp_path)!r}); "
            f"sys.argv = [{str(script)!r}, {str(tmp_path)!r}, {repo!r}]; runpy.run_path({str(script)!r})")
    res = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "standalone ok" in res.stdout
