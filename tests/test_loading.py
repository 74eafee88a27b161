"""Model loading: local directories, dtype/device handling, provenance, clear errors."""
from __future__ import annotations

import pytest
import torch

from cca_fast.errors import CCAError
from cca_fast.models.loading import default_gguf_path, load_model, resolve_dtype
from helpers import make_tiny


def test_local_directory_roundtrip(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(97)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w2")
    model = make_tiny("qwen2", dtype=torch.float32)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    loaded, tok2 = load_model(str(tmp_path), dtype="float64", device="cpu", attn_implementation="eager")
    assert loaded.dtype == torch.float64
    assert loaded.cca_source.kind == "local"
    assert tok2.padding_side == "left" and tok2.pad_token_id is not None  # pad falls back to eos
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=0, msg=n)  # fp32 -> fp64 is exact


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(CCAError, match="model path not found"):
        load_model("./no/such/model")
    with pytest.raises(CCAError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CCAError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(CCAError, match="unknown attention implementation"):
        load_model(str(tmp_path / "empty"), attn_implementation="magic")
    with pytest.raises(CCAError, match="unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))


def test_default_model_is_shipped_as_gguf():
    path = default_gguf_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
