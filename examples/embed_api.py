"""cca_fast embedded in your own code, end to end, with top-level names only.

Two models go through the same path: a plain transformers model and a peft LoRA model of it.

    attribute -> select -> run_update -> delta (save / load) -> apply / revert -> merge

The models are tiny (built here from a config, random weights: nothing is downloaded), so the
script runs in seconds on a CPU; replace ``tiny_model()`` by ``cca.load_model(...)`` (or your own
model) and the examples by the pivots of stage 1 for real use.

    python examples/embed_api.py OUTPUT_DIR

Every step checks what it claims (the update raises the logit difference, a revert restores the
weights bit for bit, a merged model reloads with the delta in it) and exits non-zero if not.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import cca_fast as cca

VOCAB = 128


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A 2-layer llama with random weights (4 query heads in 2 GQA groups, 96 MLP neurons)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config).eval()


def lora_model(seed: int = 0) -> torch.nn.Module:
    """The same model with a LoRA (r=4) on the q / v / up projections, its B not zero (so the
    adapter changes what the model computes, as a trained one does)."""
    import peft

    model = peft.get_peft_model(tiny_model(seed), peft.LoraConfig(r=4, lora_alpha=8,
                                                                  target_modules=["q_proj", "v_proj", "up_proj"]))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def pivot_examples(n: int = 8, seed: int = 0) -> list[cca.PivotExample]:
    """``n`` examples: a prefix whose last token is the intervention position, a desired and an
    undesired next token (stage 1 finds these in real traces)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prefix = torch.randint(3, VOCAB, (int(torch.randint(5, 12, (1,), generator=g)),), generator=g).tolist()
        desired, undesired = torch.randint(3, VOCAB, (2,), generator=g).tolist()
        out.append(cca.PivotExample(f"p{i}", tuple(prefix), desired, undesired if undesired != desired else 3))
    return out


def mean_logit_diff(model: torch.nn.Module, batch: cca.PivotBatch) -> float:
    """Mean ``logit[desired] - logit[undesired]`` at the intervention position."""
    model = cca.unwrap_model(model)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits[:, -1]
    rows = torch.arange(len(batch))
    return float((logits[rows, batch.desired] - logits[rows, batch.undesired]).mean())


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        sys.exit(1)


def run(name: str, make, out: Path) -> None:
    print(f"--- {name}")
    model = make()
    examples = pivot_examples()
    batch = cca.collate(examples, pad_id=0)
    space = cca.ComponentSpace(model)  # peft / torch.compile / your wrapper: looked through
    print(space)

    # stage 2: attribution of every head and neuron, then the top 8 by signed score
    attr = cca.attribute(model, batch)
    selection = cca.select("atp-topk", space, scores=attr, k=8)
    print(selection)

    # stage 3: only the selected rows change (under peft: the base rows; the LoRA stays as it is)
    before = mean_logit_diff(model, batch)
    result = cca.run_update(model, space, selection, examples, cca.UpdateConfig(max_steps=10, lr=0.05),
                            validate=lambda m: mean_logit_diff(m, batch))
    print(result)
    after = mean_logit_diff(model, batch)
    check(after > before, f"run_update raised the mean logit difference {before:.3f} -> {after:.3f}")
    check([str(c) for c in space.parse(result.delta.meta["components"])] == result.delta.meta["components"],
          "the delta's component names parse back into components")

    # the delta: saved, loaded, applied to a fresh copy of the base model, reverted bit for bit
    saved = result.delta.save(out / name / "delta")
    delta = cca.SparseDelta.load(saved)
    fresh = make()
    base = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    handle = cca.apply_delta(fresh, delta)
    check(abs(mean_logit_diff(fresh, batch) - after) < 1e-4, "the loaded delta applied to a fresh model gives the same")
    cca.revert_delta(fresh, handle)
    check(all(torch.equal(p, base[n]) for n, p in fresh.named_parameters()), "revert restored every weight bit for bit")

    # merge: a plain transformers model with the delta in it (of a peft model: its base model)
    merged_dir = cca.merge_delta(fresh, delta, out / name / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    if name == "lora":  # the adapter is saved on its own and loads on top of the merged base
        import peft

        fresh.save_pretrained(out / name / "adapter")
        merged = peft.PeftModel.from_pretrained(merged, out / name / "adapter").eval()
    check(abs(mean_logit_diff(merged, batch) - after) < 1e-4, f"the merged model ({merged_dir}) reloads with the delta")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="directory for the deltas and merged models (must not exist)")
    args = parser.parse_args(argv)
    run("plain", tiny_model, args.output)
    run("lora", lora_model, args.output)
    print("all checks passed")


if __name__ == "__main__":
    main()
