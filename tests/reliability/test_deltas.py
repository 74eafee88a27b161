"""Issue 13, points 3, 1 (``--merge`` temp folders) and 8 (empty delta): a delta is verified as a
whole before anything is applied, a merge leaves no temporary folder behind, a run that keeps the
base weights writes an empty delta.

Every bad delta here is made by the test: saved properly, then edited. Edits that keep the recorded
hashes consistent (``_rewrite``) stand for a buggy or hand-made writer: the structural checks must
refuse them by themselves.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from cca_fast import ComponentSpace
from cca_fast.cli.main import main
from cca_fast.delta import (CONFIG_NAME, WEIGHTS_NAME, SparseDelta, apply_delta, bitwise_equal, content_sha256,
                            merge_delta)
from cca_fast.errors import CCAError
from helpers import make_tiny, save_model_dir


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 97)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _delta():
    base = make_tiny("llama", dtype=torch.float32)
    new = make_tiny("llama", dtype=torch.float32)
    plan = ComponentSpace(new).owned_rows([0, 30])
    with torch.no_grad():
        for name, sel in plan.items():
            p = new.get_parameter(name)
            p.index_copy_(sel.dim, sel.index, p.index_select(sel.dim, sel.index) + 0.01)
    return base, new, SparseDelta.from_models(base, new)


@pytest.fixture()
def saved(tmp_path):
    base, new, delta = _delta()
    base_dir = save_model_dir(base, _tokenizer(), tmp_path / "base")
    return base_dir, delta.save(tmp_path / "delta"), delta


def _config(d):
    return json.loads((d / CONFIG_NAME).read_text())


def _write_config(d, cfg, rehash=False):
    if rehash:
        cfg["content_sha256"] = content_sha256(cfg)
    (d / CONFIG_NAME).write_text(json.dumps(cfg))


def _rewrite(d, edit_tensors=None, edit_config=None):
    """Edit the tensors and/or config, then make every recorded hash consistent again."""
    from safetensors.torch import load, save

    tensors = load((d / WEIGHTS_NAME).read_bytes())
    cfg = _config(d)
    if edit_tensors:
        edit_tensors(tensors, cfg)
    blob = save(tensors)
    (d / WEIGHTS_NAME).write_bytes(blob)
    cfg["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    if edit_config:
        edit_config(cfg)
    _write_config(d, cfg, rehash=True)


def _cli_refuses(capsys, base_dir, delta_dir, *words):
    """``cca apply`` exits 2 with every word in its message and leaves the base model untouched."""
    before = (base_dir / "model.safetensors").read_bytes()
    assert main(["apply", str(delta_dir), "--model", str(base_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert (base_dir / "model.safetensors").read_bytes() == before
    return err


def test_edited_parameter_entry_is_refused(saved, capsys):
    base_dir, d, _ = saved
    cfg = _config(d)
    name = next(iter(cfg["params"]))
    cfg["params"][name]["dim"] = 1 - cfg["params"][name]["dim"]
    _write_config(d, cfg)
    _cli_refuses(capsys, base_dir, d, "modified after it was saved", "re-create the delta")


def test_deleted_parameter_entry_is_refused(saved, capsys):
    base_dir, d, _ = saved
    cfg = _config(d)
    name = sorted(cfg["params"])[0]
    del cfg["params"][name]
    _write_config(d, cfg)
    _cli_refuses(capsys, base_dir, d, "modified after it was saved")
    _write_config(d, cfg, rehash=True)  # even with a consistent hash, the orphan rows are noticed
    _cli_refuses(capsys, base_dir, d, f"no entry for parameter {name!r}", "an entry was deleted", "in part")


def test_missing_content_hash_is_refused(saved):
    _, d, _ = saved
    cfg = _config(d)
    del cfg["content_sha256"]
    _write_config(d, cfg)
    with pytest.raises(CCAError, match="no content_sha256.*re-create the delta"):
        SparseDelta.load(d)


def test_descriptive_entries_may_be_edited(saved):
    _, d, delta = saved
    cfg = _config(d)
    cfg["metrics"] = {"note": "edited by hand"}
    cfg["base_model"]["name_or_path"] = "/moved/base"
    _write_config(d, cfg)
    assert set(SparseDelta.load(d).params) == set(delta.params)


def test_duplicated_row_index_is_refused(saved, capsys):
    base_dir, d, _ = saved

    def dup(tensors, cfg):
        name = max(cfg["params"], key=lambda n: cfg["params"][n]["rows"])
        idx = tensors[f"{name}::index"]
        idx[1] = idx[0]

    _rewrite(d, dup)
    _cli_refuses(capsys, base_dir, d, "appears more than once", "re-create the delta")


def test_nan_and_inf_rows_are_refused(saved, capsys):
    from cca_fast.delta import tensor_sha256

    base_dir, d, _ = saved
    for bad in (float("nan"), float("inf")):
        def poison(tensors, cfg):
            name = sorted(cfg["params"])[0]
            t = tensors[f"{name}::new"]
            t.view(-1)[3] = bad
            cfg["params"][name]["new_sha256"] = tensor_sha256(t)

        _rewrite(d, poison)
        _cli_refuses(capsys, base_dir, d, "NaN/Inf", "lower --lr")


@pytest.mark.parametrize("edit, words", [
    (lambda c: c["params"][sorted(c["params"])[0]].pop("dim"), ["lacks 'dim'"]),
    (lambda c: c["params"][sorted(c["params"])[0]].update(dim="0"), ["'dim' must be int"]),
    (lambda c: c["params"][sorted(c["params"])[0]].update(dim=5), ["outside its shape"]),
    (lambda c: c["params"][sorted(c["params"])[0]].update(rows=99), ["records 99 rows"]),
    (lambda c: c.update(params=[]), ["'params' must be an object", "got list"]),
    (lambda c: c.pop("params"), ["'params' must be an object", "got NoneType"]),
    (lambda c: c["params"].update({sorted(c["params"])[0]: 3}), ["the entry must be an object", "got int"]),
    (lambda c: c.update(format_version="2"), ["format_version '2' is not a positive integer"]),
])
def test_malformed_config_is_refused_not_a_key_error(saved, capsys, edit, words):
    base_dir, d, _ = saved
    _rewrite(d, edit_config=edit)
    _cli_refuses(capsys, base_dir, d, *words)


def test_deltas_of_format_version_1_still_load(saved, capsys):
    """A delta saved before the content hash: loads with the structural checks (re-save to add the hash)."""
    base_dir, d, delta = saved
    cfg = _config(d)
    for k in ("content_sha256", "content_sha256_covers"):
        del cfg[k]
    cfg["format_version"] = 1
    params = json.loads(json.dumps(cfg["params"]))
    _write_config(d, cfg)
    assert main(["apply", str(d), "--model", str(base_dir), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["applied"]
    del cfg["params"][sorted(cfg["params"])[0]]  # still: a deleted entry is noticed
    _write_config(d, cfg)
    with pytest.raises(CCAError, match="an entry was deleted"):
        SparseDelta.load(d)
    _write_config(d, {**cfg, "params": params})
    SparseDelta.load(d).save(d)  # re-saving adds the hash
    assert _config(d)["format_version"] == 2 and "content_sha256" in _config(d)


def test_max_abs_change_never_hides_a_nan(tmp_path):
    base, _, delta = _delta()
    pd = next(iter(delta.params.values()))
    pd.new.view(-1)[0] = float("nan")
    s = delta.summary()
    assert s["max_abs_change"] != s["max_abs_change"] and s["non_finite_values"] == 1  # NaN, counted
    with pytest.raises(CCAError, match="NaN/Inf"):
        delta.save(tmp_path / "d")
    assert not (tmp_path / "d" / CONFIG_NAME).exists()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    with pytest.raises(CCAError, match="NaN/Inf"):
        apply_delta(base, delta)  # an in-memory delta is checked too, before the first write
    for n, p in base.named_parameters():
        assert bitwise_equal(p, before[n]), n


def test_in_memory_duplicate_index_is_refused_before_any_write():
    base, _, delta = _delta()
    pd = next(iter(delta.params.values()))
    pd.index = torch.tensor([int(pd.index[0])] * pd.n_rows)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    with pytest.raises(CCAError, match="appears more than once"):
        apply_delta(base, delta)
    for n, p in base.named_parameters():
        assert bitwise_equal(p, before[n]), n


# ---------------------------------------------------------------- point 8: the base kept -> empty delta

def test_base_kept_gives_an_empty_delta_and_applying_it_is_a_no_op(tmp_path, capsys):
    from cca_fast.stages.examples import PivotExample
    from cca_fast.stages.update import UpdateConfig, run_update

    model = make_tiny("llama", dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ex = [PivotExample(f"p{i}", (5, 6, 7 + i), 10, 11) for i in range(3)]
    calls = []

    def validate(m):  # the base scores best
        calls.append(1)
        return 1.0 if len(calls) == 1 else 0.0

    for scope in ("selected", "all"):  # "all": the no-mask baseline, once 331 MB for a kept base
        res = run_update(model, ComponentSpace(model), [0, 30], ex,
                         UpdateConfig(lr=0.05, max_steps=2, scope=scope, store_base_rows=scope == "selected"),
                         validate=validate)
        calls.clear()
        assert res.best_step == 0 and res.delta.params == {} and res.delta.meta["kept_base"]
        assert res.delta.summary()["empty"] and res.delta.summary()["rows"] == 0
    d = res.delta.save(tmp_path / "delta")
    assert (d / WEIGHTS_NAME).stat().st_size < 1000
    model.save_pretrained(tmp_path / "base")
    _tokenizer().save_pretrained(tmp_path / "base")
    assert main(["apply", str(d), "--model", str(tmp_path / "base"), "--device", "cpu", "--revert-check"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"] == 0 and "empty delta" in report["note"] and report["revert_check"]["ok"]
    apply_delta(model, SparseDelta.load(d))
    for n, p in model.named_parameters():
        assert bitwise_equal(p, before[n]), n


def test_report_says_the_base_was_kept():
    from cca_fast.experiments.report import render_markdown

    assert "base weights are kept" in render_markdown({"best_step": 0})
    assert "base weights are kept" not in render_markdown({"best_step": 3})


# ---------------------------------------------------------------- point 1: --merge temp folders

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_failed_merge_leaves_no_temp_folder_and_stale_ones_are_removed(tmp_path, monkeypatch):
    _, new, delta = _delta()
    model = make_tiny("llama", dtype=torch.float32)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", disk_full)
    with pytest.raises(OSError):
        merge_delta(model, delta, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no target, no temp folder
    monkeypatch.undo()

    stale = tmp_path / f".merged.tmp-{_dead_pid()}-abc"  # a merge killed by SIGKILL
    (stale / "x").mkdir(parents=True)
    live = tmp_path / f".merged.tmp-{1}-abc"  # pid 1 is alive: another process's merge in progress
    live.mkdir()
    model = make_tiny("llama", dtype=torch.float32)
    out = merge_delta(model, delta, tmp_path / "merged")
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "merged"])
    assert (out / "model.safetensors").exists()


def test_merge_target_is_checked_before_loading_and_overwrite_swaps(saved, tmp_path, capsys):
    base_dir, d, delta = saved
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("finished work")
    # refused before the model is loaded: the (missing) model path is never reached
    assert main(["apply", str(d), "--model", "./no/such/model", "--merge", str(out)]) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "--overwrite" in err and "model path not found" not in err
    assert (out / "keep.txt").read_text() == "finished work"
    assert main(["apply", str(d), "--model", str(base_dir), "--device", "cpu", "--merge", str(out), "--overwrite"]) == 0
    capsys.readouterr()
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folder left
