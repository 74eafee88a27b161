"""Few-shot chain-of-thought prompts and the paper's answer extractor (docs/method.md section 0).

Plain prompt (paper default, no chat template)::

    As an expert problem solver, solve step by step the following mathematical questions.
    <blank line>
    Q: <shot 1 question>
    A: Let's think step by step. <shot 1 target>
    <blank line>
    ...
    Q: <shot 8 question>
    A: Let's think step by step. <shot 8 target>
    <blank line>
    Q: <target question>
    A: Let's think step by step.

docs/method.md gives each shot as ``Q: <question>\\nA: Let's think step by step. <target>\\n``; the
instruction line and the blocks (shots, then the target question) are separated by one blank
line, i.e. the shot strings are joined with ``"\\n"`` and the instruction is followed by
``"\\n\\n"``. This is the GSM-Symbolic layout (one blank line between Q/A blocks) and
what the paper's reference prompt produces. The prompt ends right after ``step by step.``
(no trailing space or newline), so the model's first token starts its reasoning.

Chat prompt (``mode="chat"``): the tokenizer's chat template with the shots as alternating
user / assistant turns (user: the question, the first one preceded by the instruction and a blank
line, or the instruction as a system turn with ``instruction_as_system=True``; assistant:
``Let's think step by step. <target>``), then the target question as a user turn and
``add_generation_prompt=True``.

Answer extraction follows the paper's extractor exactly, quirks included: the text is cut after
the first match of ``answer is[^.]*\\.``, which stops at the *first* dot, so ``The answer is
3.50.`` is read as ``3.`` = 3.0 (a decimal point ends the answer sentence). Generation stops at
the same pattern, so the model never gets further than that dot either.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence, Union

from cca_fast.errors import CCAError, DataError
from cca_fast.io import refuse_special_file
from cca_fast.generation.stops import MarkerStop, PatternStop, StopRule

DEFAULT_INSTRUCTION = "As an expert problem solver, solve step by step the following mathematical questions."
ANSWER_PREFIX = "Let's think step by step."
#: The answer sentence (docs/method.md section 0): generation stops at, and extraction cuts after, its
#: first match.
ANSWER_PATTERN = r"answer is[^.]*\."
NUMBER_PATTERN = r"-?\d+\.?\d*"
PROMPT_MODES = ("plain", "chat")
#: The start of the next few-shot question: generation stops before it (docs/method.md section 0).
NEW_QUESTION_MARKER = "\nQ:"

_ANSWER_RE = re.compile(ANSWER_PATTERN)
_NUMBER_RE = re.compile(NUMBER_PATTERN)
_GOLD_RE = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")


@dataclass(frozen=True)
class Exemplar:
    """One few-shot example: ``question`` and its chain-of-thought ``target`` (ending ``The final
    answer is N.``)."""

    question: str
    target: str

    def to_dict(self) -> dict[str, str]:
        return {"question": self.question, "target": self.target}


ExemplarSource = Union[None, str, Path, Sequence[Union[Exemplar, dict]]]


@dataclass
class PromptConfig:
    """How questions become prompts.

    Attributes:
        mode: ``"plain"`` (paper default: text, no chat template) or ``"chat"`` (the tokenizer's
            chat template, shots as user/assistant turns).
        exemplars: ``None`` for the built-in 8 exemplars, a path to a JSON file (list of
            ``{"question", "target"}``), or a list of :class:`Exemplar` / dicts.
        n_shots: how many exemplars to use (the first ``n_shots``); 0 = zero-shot.
        instruction: the line before the shots (``""`` = none).
        instruction_as_system: chat mode only: put the instruction in a system turn instead of
            the first user turn (some templates, e.g. Gemma's, reject system turns).
    """

    mode: str = "plain"
    exemplars: ExemplarSource = None
    n_shots: int = 8
    instruction: str = DEFAULT_INSTRUCTION
    instruction_as_system: bool = False
    _cache: list[Exemplar] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in PROMPT_MODES:
            raise CCAError(f"unknown prompt mode {self.mode!r}; use one of {', '.join(PROMPT_MODES)}")
        if not isinstance(self.n_shots, int) or self.n_shots < 0:
            raise CCAError(f"n_shots must be a non-negative integer, got {self.n_shots!r}")

    def shots(self) -> list[Exemplar]:
        """The ``n_shots`` exemplars in use (loaded once)."""
        if self._cache is None:
            if self.exemplars is None or isinstance(self.exemplars, (str, Path)):
                exemplars = load_exemplars(self.exemplars)
            else:
                exemplars = [_as_exemplar(e, f"exemplar {i}") for i, e in enumerate(self.exemplars)]
            if self.n_shots > len(exemplars):
                raise CCAError(f"n_shots={self.n_shots} but only {len(exemplars)} exemplars are available; "
                               "lower n_shots or provide more exemplars")
            self._cache = exemplars[: self.n_shots]
        return self._cache

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description (exemplars inlined when given as a list)."""
        ex = self.exemplars
        if ex is not None and not isinstance(ex, (str, Path)):
            ex = [_as_exemplar(e, "exemplar").to_dict() for e in ex]
        return {"mode": self.mode, "exemplars": str(ex) if isinstance(ex, Path) else ex,
                "n_shots": self.n_shots, "instruction": self.instruction,
                "instruction_as_system": self.instruction_as_system}


def _as_exemplar(e: Any, where: str) -> Exemplar:
    if isinstance(e, Exemplar):
        return e
    if not isinstance(e, dict):
        raise DataError(f"{where}: expected an object with 'question' and 'target', got {type(e).__name__}")
    missing = [k for k in ("question", "target") if k not in e]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)}; each exemplar needs 'question' and 'target'")
    q, t = e["question"], e["target"]
    if not isinstance(q, str) or not isinstance(t, str) or not q.strip() or not t.strip():
        raise DataError(f"{where}: 'question' and 'target' must be non-empty strings")
    return Exemplar(q.strip(), t.strip())


def default_exemplars_path() -> Path:
    """The project's own 8 exemplars (``cca_fast/data/builtin/exemplars.json``)."""
    return Path(str(resources.files("cca_fast") / "data" / "builtin" / "exemplars.json"))


def load_exemplars(path: str | Path | None = None) -> list[Exemplar]:
    """Read few-shot exemplars: a JSON list of ``{"question": str, "target": str}``.

    Args:
        path: the file; ``None`` = the built-in 8 exemplars.
    Raises:
        DataError: missing file, invalid JSON, or a malformed entry (the message names it).
    """
    p = Path(path).expanduser() if path is not None else default_exemplars_path()
    refuse_special_file(p, "the exemplar file", error=DataError)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"exemplar file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read exemplar file {p}: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"exemplar file {p} is not valid JSON: {e}") from None
    if not isinstance(data, list) or not data:
        raise DataError(f"exemplar file {p} must hold a non-empty JSON list of "
                        '{"question": ..., "target": ...} objects')
    return [_as_exemplar(e, f"{p}: entry {i}") for i, e in enumerate(data)]


def format_shot(question: str, target: str) -> str:
    """``Q: <question>\\nA: Let's think step by step. <target>\\n`` (docs/method.md section 0)."""
    return f"Q: {question}\nA: {ANSWER_PREFIX} {target}\n"


def format_question(question: str) -> str:
    """``Q: <question>\\nA: Let's think step by step.``: the end of every plain prompt."""
    return f"Q: {question}\nA: {ANSWER_PREFIX}"


def build_prompt(question: str, config: PromptConfig | None = None, tokenizer: Any = None) -> str:
    """The prompt text for ``question`` (see the module docstring for the exact layout).

    Chat mode needs ``tokenizer`` (with a chat template); its result already contains the
    template's special tokens, so encode it with ``add_special_tokens=False`` (as
    :func:`encode_prompts` does).
    """
    config = config or PromptConfig()
    shots = config.shots()
    if config.mode == "plain":
        blocks = [format_shot(s.question, s.target) for s in shots] + [format_question(question)]
        body = "\n".join(blocks)
        return f"{config.instruction}\n\n{body}" if config.instruction else body
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise CCAError("prompt mode 'chat' needs a tokenizer with a chat template; "
                       "use --prompt-mode plain for this model")
    messages = chat_messages(question, config)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # template errors (e.g. "System role not supported") are user-fixable
        raise CCAError(f"the tokenizer's chat template rejected the prompt: {e}; "
                       "try instruction_as_system=False or --prompt-mode plain") from None


def chat_messages(question: str, config: PromptConfig) -> list[dict[str, str]]:
    """The chat turns for ``question``: shots as user/assistant pairs, then the question."""
    messages: list[dict[str, str]] = []
    lead = ""
    if config.instruction:
        if config.instruction_as_system:
            messages.append({"role": "system", "content": config.instruction})
        else:
            lead = config.instruction + "\n\n"
    for s in config.shots():
        messages.append({"role": "user", "content": lead + s.question})
        messages.append({"role": "assistant", "content": f"{ANSWER_PREFIX} {s.target}"})
        lead = ""
    messages.append({"role": "user", "content": lead + question})
    return messages


def encode_prompts(prompts: Sequence[str], tokenizer: Any, config: PromptConfig | None = None) -> list[list[int]]:
    """Token ids of each prompt. Plain prompts get the tokenizer's special tokens (e.g. BOS);
    chat prompts do not (the template already wrote them)."""
    add_special = (config or PromptConfig()).mode == "plain"
    return [list(tokenizer(p, add_special_tokens=add_special)["input_ids"]) for p in prompts]


def paper_stops(marker: str | None = NEW_QUESTION_MARKER) -> tuple[StopRule, ...]:
    """The paper's text stop rules for :class:`~cca_fast.generation.GenerationConfig` ``stops``:
    the answer sentence (``"answer"``, the text keeps it up to its dot; it never spans a dot
    except at its end) and, unless ``marker`` is ``None``, the next few-shot question
    (``"new_question"``, the text ends before the marker)."""
    answer = PatternStop(ANSWER_PATTERN, reason="answer", boundary=".")
    return (answer,) if not marker else (answer, MarkerStop(marker, reason="new_question"))


def find_answer_end(text: str) -> int | None:
    """Character index just past the first ``answer is[^.]*\\.`` match, or ``None``."""
    m = _ANSWER_RE.search(text)
    return m.end() if m else None


def extract_answer(text: str) -> float | None:
    """The paper's extractor: cut ``text`` after the first ``answer is[^.]*\\.`` match (if any),
    drop commas, return the last number ``-?\\d+\\.?\\d*`` as float; ``None`` if there is none."""
    end = find_answer_end(text)
    if end is not None:
        text = text[:end]
    numbers = _NUMBER_RE.findall(text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def is_correct(prediction: float | None, gold: float) -> bool:
    """Exact float match (docs/method.md section 0); ``None`` is never correct."""
    return prediction is not None and float(prediction) == float(gold)


def gold_from_answer(answer_text: str) -> float:
    """The number after the last ``####`` in a GSM8K-style solution, read strictly: an integer
    or a decimal, optional thousands commas and ``$`` (``#### 3/4``, ``#### 1e3``, ``#### nan``
    are refused, not half-read; see :func:`cca_fast.data.loaders.parse_gold`).

    Raises:
        DataError: no ``#### N`` in the text, or ``N`` is not such a number.
    """
    from cca_fast.data.loaders import parse_gold  # noqa: PLC0415 - data layer, imported lazily

    if "####" not in answer_text:
        snippet = answer_text[-80:].replace("\n", " ")
        raise DataError(f"no '#### <number>' gold answer in solution text ...{snippet!r}")
    tail = answer_text.rsplit("####", 1)[1]
    return parse_gold(tail.split("\n", 1)[0], "solution text (after '####')")
