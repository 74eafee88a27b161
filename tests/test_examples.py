"""The scripts in ``examples/`` run end to end (each checks its own claims and exits non-zero
when one fails), in a fresh interpreter as a user runs them."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_embed_api_uses_top_level_names_only():
    tree = ast.parse((EXAMPLES / "embed_api.py").read_text(encoding="utf-8"))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert [m for m in imported if m.startswith("cca_fast")] == ["cca_fast"], imported
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and getattr(n.value, "id", None) == "cca"}
    import cca_fast

    assert used <= set(cca_fast.__all__), used - set(cca_fast.__all__)
    assert {"attribute", "select", "run_update", "apply_delta", "revert_delta", "merge_delta"} <= used


def test_embed_api_runs(tmp_path):
    pytest.importorskip("peft")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    res = subprocess.run([sys.executable, str(EXAMPLES / "embed_api.py"), str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("ok    ") == 10 and "FAIL" not in res.stdout
    assert "all checks passed" in res.stdout
    for name in ("plain", "lora"):
        assert (tmp_path / "out" / name / "delta" / "delta_config.json").is_file()
        assert (tmp_path / "out" / name / "merged" / "config.json").is_file()
