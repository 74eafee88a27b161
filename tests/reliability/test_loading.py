"""Issue 13, point 6 (and point 1's GGUF temp folders): model loading errors are ours, early and
actionable, never a library's traceback.

Every bad model is made here from a tiny llama saved with ``save_pretrained`` (or written byte by
byte); each case checks the exit status of ``cca apply`` (an empty delta, so only the loading
matters) or the :class:`CCAError`, that the message names the cause and the fix, and that the bad
input itself is left as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cca_fast.cli.main import main
from cca_fast.delta import SparseDelta
from cca_fast.errors import CCAError
from cca_fast.models.loading import load_model
from helpers import char_tokenizer, make_tiny


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("good") / "model"
    make_tiny("llama", dtype=torch.float32).save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


@pytest.fixture()
def model_dir(good, tmp_path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "model"))


@pytest.fixture(scope="module")
def empty_delta(tmp_path_factory) -> Path:
    return SparseDelta({}, {"model_type": "llama", "dtype": "float32"}).save(tmp_path_factory.mktemp("d") / "delta")


def _snapshot(p: Path) -> dict[str, bytes]:
    if p.is_file():
        return {p.name: p.read_bytes()}
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def _refused(capsys, delta, model, *words, device="cpu"):
    """``cca apply --model MODEL`` exits 2, with one line naming every word, and MODEL unchanged."""
    before = _snapshot(Path(model)) if Path(model).exists() else None
    argv = ["apply", str(delta), "--model", str(model)] + (["--device", device] if device else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: transformers' progress bars, if any)
    assert err.startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    if before is not None:
        assert _snapshot(Path(model)) == before
    return err


def test_the_good_model_loads(capsys, model_dir, empty_delta):
    assert main(["apply", str(empty_delta), "--model", str(model_dir), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["applied"]


def test_truncated_safetensors(capsys, model_dir, empty_delta):
    w = model_dir / "model.safetensors"
    blob = w.read_bytes()
    w.write_bytes(blob[: len(blob) // 2])
    _refused(capsys, empty_delta, model_dir, "model.safetensors is truncated", "download it again")
    w.write_bytes(blob[:5])  # not even a header
    _refused(capsys, empty_delta, model_dir, "not a valid safetensors file", "truncated or corrupt")


def test_unknown_model_type(capsys, model_dir, empty_delta):
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "model_type": "llamma"}))
    _refused(capsys, empty_delta, model_dir, "unknown model_type 'llamma'", "upgrade transformers")
    (model_dir / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "model_type"}))
    _refused(capsys, empty_delta, model_dir, "has no model_type")
    (model_dir / "config.json").write_text("{broken")
    _refused(capsys, empty_delta, model_dir, "config.json is not valid JSON")


def test_remote_code_is_refused(capsys, model_dir, empty_delta):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(model_type="my_custom_lm", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                                     "AutoModelForCausalLM": "modeling_my.MyModel"})
    (model_dir / "config.json").write_text(json.dumps(cfg))
    (model_dir / "modeling_my.py").write_text("raise SystemExit('remote code ran')\n")
    _refused(capsys, empty_delta, model_dir, "remote code", "refuses to run")


def test_missing_tokenizer(capsys, model_dir, empty_delta):
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / f).unlink(missing_ok=True)
    _refused(capsys, empty_delta, model_dir, "has no tokenizer", "tokenizer.save_pretrained")


def test_broken_tokenizer(capsys, model_dir, empty_delta):
    (model_dir / "tokenizer.json").write_text("{not json")
    _refused(capsys, empty_delta, model_dir, "could not load the tokenizer", "save a working tokenizer")


@pytest.mark.parametrize("change, words", [
    ({"num_hidden_layers": 3}, ["num_hidden_layers is 3", "weights hold 2 layers", "random",
                                "set num_hidden_layers to 2"]),
    ({"intermediate_size": 30}, ["weights do not fit its config", "another shape", "config.json matches the weights"]),
])
def test_inconsistent_config(capsys, model_dir, empty_delta, change, words):
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, **change}))
    _refused(capsys, empty_delta, model_dir, *words)


@pytest.mark.parametrize("change, words", [
    # the layer count: 0 was evaluated with the layers dropped ("accuracy 0.5"), -1 a raw ValueError
    ({"num_hidden_layers": 0}, ["num_hidden_layers is 0", "positive integer", "weights hold 2 layers", "set it to 2"]),
    ({"num_hidden_layers": -1}, ["num_hidden_layers is -1", "positive integer", "set it to 2"]),
    ({"num_hidden_layers": 1}, ["num_hidden_layers is 1", "weights hold 2 layers", "dropped silently",
                                "set num_hidden_layers to 2"]),
    ({"num_hidden_layers": "2"}, ["num_hidden_layers is '2'", "positive integer"]),
    # head counts: were "could not load the tokenizer" (transformers' config check, run by the tokenizer)
    ({"num_attention_heads": 5}, ["num_attention_heads 5 is not a multiple of num_key_value_heads 2", "fix one"]),
    ({"num_attention_heads": 4}, ["num_attention_heads is 4", "q_proj has 36 rows", "set num_attention_heads to 6"]),
    ({"num_key_value_heads": 3}, ["num_key_value_heads is 3", "k_proj has 12 rows", "set num_key_value_heads to 2"]),
    ({"num_attention_heads": 0}, ["num_attention_heads is 0", "positive integer"]),
    ({"head_dim": None, "hidden_size": 35}, ["hidden_size 35 is not a multiple of num_attention_heads 6"]),
    # the vocabulary
    ({"vocab_size": 10}, ["vocab_size is 10", "token embedding has 97 rows", "set vocab_size to 97"]),
])
def test_config_contradicting_its_weights_is_refused_before_anything_loads(capsys, model_dir, empty_delta, change,
                                                                           words, monkeypatch):
    import transformers

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(change)
    (model_dir / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    for auto in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(auto, "from_pretrained", lambda *a, **k: pytest.fail("loading started before the check"))
    _refused(capsys, empty_delta, model_dir, str(model_dir / "config.json"), *words)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(capsys, tmp_path, empty_delta):
    from transformers import LlamaForCausalLM

    config = make_tiny("llama", dtype=torch.float32).config
    config.vocab_size = 50  # the weights agree with it; the tokenizer (79 tokens) does not
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "small")
    char_tokenizer().save_pretrained(tmp_path / "small")
    assert len(char_tokenizer()) == 79
    _refused(capsys, empty_delta, tmp_path / "small", "tokenizer has 79 tokens", "only 50",
             "token ids 50 and above would fail", "use the tokenizer the model was trained with")


def test_pickle_bin_is_refused(capsys, model_dir, empty_delta):
    sd = {k: v for k, v in make_tiny("llama", dtype=torch.float32).state_dict().items()}
    (model_dir / "model.safetensors").unlink()
    torch.save(sd, model_dir / "pytorch_model.bin")
    _refused(capsys, empty_delta, model_dir, "pickle", "arbitrary code", "needs safetensors")
    _refused(capsys, empty_delta, model_dir / "pytorch_model.bin", "pickle", "needs safetensors",
             "pass the model directory")


def test_no_weights_at_all(capsys, model_dir, empty_delta):
    (model_dir / "model.safetensors").unlink()
    _refused(capsys, empty_delta, model_dir, "has no weights", "save_pretrained")


def test_device_cuda_without_cuda(capsys, model_dir, empty_delta, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(capsys, empty_delta, model_dir, "CUDA is not available", "--device cpu", device="cuda")


def _no_hub_and_no_load(monkeypatch) -> None:
    """Fail the test if the hub is asked or transformers starts loading: "at once" means before
    either (no ~60 s of hub retries)."""
    import huggingface_hub
    import transformers

    def forbidden(*a, **k):
        raise AssertionError("the hub was asked / transformers was called before the cheap checks refused")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", forbidden)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbidden)


def test_missing_relative_path_is_reported_at_once(capsys, empty_delta, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    _no_hub_and_no_load(monkeypatch)
    for name in ("./no/such/model", "no/such/model", "../nope", "out/model/"):
        _refused(capsys, empty_delta, name, "model path not found")


def test_offline_hub_id_fails_fast(capsys, empty_delta, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    _no_hub_and_no_load(monkeypatch)
    for name in ("someorg/no-such-model-xyz", "out/model"):  # an id, or a relative folder that is not there
        _refused(capsys, empty_delta, name, "is not a local path", "not in the Hugging Face cache", "HF_HUB_OFFLINE")


# ---------------------------------------------------------------- GGUF files and the conversion cache

def _gguf(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "m.gguf"
    p.write_bytes(data)
    return p


def test_garbage_gguf(capsys, empty_delta, tmp_path, monkeypatch):
    monkeypatch.setenv("CCA_FAST_CACHE", str(tmp_path / "cache"))
    g = _gguf(tmp_path, os.urandom(4096))
    _refused(capsys, empty_delta, g, "is not a GGUF file", "download it again")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_truncated_gguf_leaves_no_temp_folder(capsys, empty_delta, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CCA_FAST_CACHE", str(cache))
    g = _gguf(tmp_path, b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little") + b"\x07" * 20)
    stale = cache / "gguf" / f".m-0123456789abcdef.tmp-{_dead_pid()}-x"  # a conversion killed earlier
    (stale / "half").mkdir(parents=True)
    _refused(capsys, empty_delta, g, "could not read the GGUF file", "truncated", "download it again")
    assert list((cache / "gguf").iterdir()) == []  # the stale temp folder removed, no new one left


def _cache_target(cache: Path, g: Path) -> Path:
    from cca_fast.models.loading import CONVERSION_VERSION, file_sha256
    return cache / "gguf" / f"{g.stem}-{file_sha256(g)[:16]}-{CONVERSION_VERSION}"


def test_corrupt_conversion_cache_names_the_folder(capsys, good, empty_delta, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CCA_FAST_CACHE", str(cache))
    g = _gguf(tmp_path, b"GGUF" + b"\x00" * 60)
    target = _cache_target(cache, g)
    shutil.copytree(good, target)
    w = target / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])  # a cache damaged by a full disk
    err = _refused(capsys, empty_delta, g, "conversion cache folder", str(target), "delete that folder")
    assert f"rm -r '{target}'" in err
    shutil.rmtree(target)
    target.mkdir(parents=True)  # a folder without weights
    _refused(capsys, empty_delta, g, "conversion cache folder", str(target), "no model.safetensors")
    shutil.rmtree(target)
    shutil.copytree(good, target)  # whole files, but weights that do not fit the config
    cfg = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 30}))
    _refused(capsys, empty_delta, g, str(target), "delete it")


def test_load_model_raises_cca_error_directly(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CCAError, match="not a valid safetensors file"):
        load_model(str(model_dir), device="cpu")


def test_conversion_failing_mid_write_leaves_no_temp_folder(tmp_path, monkeypatch):
    """Disk full while the converted model is written: a clear error, the cache as it was."""
    import safetensors.torch
    import transformers

    cache = tmp_path / "cache"
    g = _gguf(tmp_path, b"GGUF" + b"\x00" * 60)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: char_tokenizer())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: make_tiny("llama", dtype=torch.float32))

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(CCAError, match="could not write the converted GGUF model.*CCA_FAST_CACHE"):
        load_model(str(g), device="cpu", cache_dir=cache)
    assert list((cache / "gguf").iterdir()) == []
