"""``cca_fast``'s top-level names load on first use (PEP 562), so the stand-alone kernels and a
bare ``import cca_fast`` load nothing else of the library (nor transformers). Each check runs in a
fresh interpreter: ``sys.modules`` of this one already holds everything."""
from __future__ import annotations

import json
import subprocess
import sys

import cca_fast


def _child(code: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


_LOADED = ("import json, sys; print(json.dumps({'cca': sorted(m for m in sys.modules if m.split('.')[0] == 'cca_fast'), "
           "'transformers': 'transformers' in sys.modules}))")


def test_kernels_import_nothing_else_of_the_library():
    out = _child("import cca_fast.kernels.row_grad, cca_fast.kernels.attribution, cca_fast.kernels.sparse_optim; "
                 + _LOADED)
    # cca_fast/__init__.py itself loads only cca_fast.version (the version string)
    others = [m for m in out["cca"] if m not in ("cca_fast", "cca_fast.version") and not m.startswith("cca_fast.kernels")]
    assert others == [], others
    assert not out["transformers"]


def test_bare_import_is_lazy_and_a_name_loads_its_module():
    out = _child("import cca_fast; " + _LOADED)
    assert out["cca"] == ["cca_fast", "cca_fast.version"] and not out["transformers"]
    out = _child("import cca_fast; cca_fast.ComponentSpace; " + _LOADED)
    assert "cca_fast.models.components" in out["cca"]
    assert "cca_fast.experiments.pipeline" not in out["cca"]  # only what the name needs


def test_every_exported_name_resolves_and_is_listed():
    assert set(cca_fast.__all__) <= set(dir(cca_fast))
    for name in cca_fast.__all__:
        assert getattr(cca_fast, name) is not None, name
    assert cca_fast.Selection.__name__ == "Selection" and cca_fast.UpdateResult.__name__ == "UpdateResult"
    assert cca_fast.SFTExample.__module__ == "cca_fast.stages.sft"
    try:
        cca_fast.no_such_name
    except AttributeError as e:
        assert "no attribute 'no_such_name'" in str(e)
    else:
        raise AssertionError("expected AttributeError")
