"""The layering rules the README states, checked on the source (``ast``, nothing imported):

* ``kernels/`` (installed as ``cca_fast.kernels``) imports nothing of ``cca_fast``;
* the version-dependent Hugging Face keywords (the cache keyword, ``logits_to_keep``) and the
  EOS / pad / generation-config rules are spelled only in ``models/runtime.py``;
* the file names of a run directory and a study directory are spelled only in
  ``experiments/rundir.py`` (``RunDir``, ``StudyDir``);
* no import cycle among ``cca_fast`` modules, of any length, lazy imports inside functions
  included (``if TYPE_CHECKING:`` blocks, never executed, are left out).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "cca_fast"
KERNELS = ROOT / "kernels"


def _modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every ``cca_fast`` module (``kernels/`` as ``cca_fast.kernels``)."""
    out = {}
    for base, prefix in ((PKG, "cca_fast"), (KERNELS, "cca_fast.kernels")):
        for f in base.rglob("*.py"):
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = f
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path) -> set[str]:
    """The ``cca_fast`` modules ``name`` imports (anywhere in the file, but not under
    ``if TYPE_CHECKING:``); ``from a import b`` counts as ``a.b`` when that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in MODULES else mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in MODULES and m != name}


def _graph() -> dict[str, set[str]]:
    return {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10_000))
    try:
        for v in sorted(graph):
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(old)
    return out


def test_the_cycle_finder_finds_cycles_of_any_length():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(g) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_lazy_and_relative_imports_are_edges(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                 "if TYPE_CHECKING:\n    from cca_fast.delta import SparseDelta\n"
                 "def f():\n    from cca_fast.models import runtime\n    from . import io\n")
    assert _imports("cca_fast.m", f) == {"cca_fast.models.runtime", "cca_fast.io"}


def test_no_import_cycle_among_cca_fast_modules():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (lazy imports count too): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_kernels_import_nothing_of_cca_fast():
    bad = {}
    for name, path in MODULES.items():
        if name.startswith("cca_fast.kernels"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                for m in mods:
                    if m == "cca_fast" or (m.startswith("cca_fast.") and not m.startswith("cca_fast.kernels")):
                        bad.setdefault(name, []).append(m)
    assert not bad, f"kernels/ must not import cca_fast: {bad}"


# ---- runtime rules -------------------------------------------------------------------------------
#: keyword arguments that depend on the transformers version: only models/runtime.py passes them
RUNTIME_KEYWORDS = {"past_key_values", "logits_to_keep", "num_logits_to_keep"}
#: attributes whose reading is a runtime rule (EOS ids, pad id, generation config)
RUNTIME_ATTRIBUTES = {"past_key_values", "eos_token_id", "pad_token_id", "generation_config"}
#: (module, name) pairs allowed outside runtime.py, each with its reason
RUNTIME_ALLOW = {
    # loading gives a tokenizer without a pad token one (the id of runtime.pad_id's rule)
    ("cca_fast.models.loading", "pad_token_id"),
    # lm-eval's stand-in for an empty context: BOS, else EOS, of the tokenizer (not the EOS rule)
    ("cca_fast.evaluation.suites.loglik", "eos_token_id"),
}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def test_hf_runtime_keywords_only_in_models_runtime():
    bad = []
    for name, path in MODULES.items():
        if name == "cca_fast.models.runtime":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            hits = []
            if isinstance(node, ast.Call):
                hits += [k.arg for k in node.keywords if k.arg in RUNTIME_KEYWORDS]
            elif isinstance(node, ast.Attribute) and node.attr in RUNTIME_ATTRIBUTES:
                hits.append(node.attr)
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                  and node.value in RUNTIME_KEYWORDS):  # e.g. {"logits_to_keep": n}; "generation_config" may be a key
                hits.append(node.value)
            bad += [f"{name}:{node.lineno}: {h}" for h in hits if (name, h) not in RUNTIME_ALLOW]
    assert not bad, "HF runtime rules outside models/runtime.py (ask runtime instead): " + ", ".join(bad)


# ---- file names ------------------------------------------------------------------------------------
def _dir_file_names() -> set[str]:
    from cca_fast.experiments.rundir import RunDir, StudyDir

    names = set()
    for cls in (RunDir, StudyDir):
        names |= {v for k, v in vars(cls).items() if k.isupper() and isinstance(v, str) and "." in v}
    return names


#: modules that may spell a run / study file name, and why
FILE_NAME_ALLOW = {
    "cca_fast.experiments.rundir",  # the owner
    "cca_fast.experiments.lock",  # names its lock file; RunDir.LOCK / StudyDir.LOCK are that name
}


@pytest.mark.parametrize("scope", ["cca_fast.experiments", "cca_fast.cli"])
def test_run_and_study_file_names_only_in_rundir(scope):
    names = _dir_file_names()
    assert {"report.json", "stages.json", "study.md", "lora.json"} <= names  # the rule sees the real names
    bad = []
    for name, path in MODULES.items():
        if not name.startswith(scope) or name in FILE_NAME_ALLOW:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                v = node.value
                if v in names or any(v.endswith("/" + n) for n in names):
                    bad.append(f"{name}:{node.lineno}: {v!r}")
    assert not bad, "run / study file names outside experiments/rundir.py (use RunDir / StudyDir): " + ", ".join(bad)
