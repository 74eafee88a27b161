"""GSM-Symbolic-style templates: parsing and seeded instantiation.

A template is a JSON object with ``question_annotated`` (question text with ``{var,default}``
placeholders, then ``#init:`` lines such as ``- $x = range(2, 100)`` or
``- a, b = sample(names, 2)``, optional ``#conditions:`` lines and ``#answer: expr``) and
``answer_annotated`` (a GSM8K-style solution with ``{expr}`` placeholders ending
``#### {expr}``). Optional ``question`` / ``answer`` hold the original problem, ``id`` its id
(default: the file name's stem).

Each ``#init`` right-hand side is the variable's *domain* (``range(..)``, a list, a pool,
``sample(seq)``, ``sample(seq, k)``, ``sample_sequential(seq, k)``); instantiation draws one
value per variable with a :class:`random.Random` derived from ``(seed, template id)`` and keeps
draws that satisfy every condition (rejection sampling; each condition is tested as soon as its
variables are drawn). All arithmetic is exact (see :mod:`cca_fast.data.safe_eval`).

The engine is bounded: each evaluation runs under :class:`~cca_fast.data.safe_eval.EvalLimits`
and each template under ``InstantiateConfig.max_seconds`` (with progress lines for slow ones);
when the sampler runs out of tries a small space is enumerated, so an error can say whether the
space is empty (e.g. ``#answer`` never an integer), too small for ``n`` distinct instances, or
just too large to search.
"""
from __future__ import annotations

import itertools
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Sequence

from cca_fast.errors import CCAError, DataError, TemplateError
from cca_fast.data.pools import POOLS
from cca_fast.data.problem import Problem
from cca_fast.data.safe_eval import (RNG_KEY, Draw, EvalLimits, Expression, Labelled, _EvalFailure,
                                    compile_expression, display_text, eval_limits, format_number,
                                    is_number, labelled_item, parse_number_text, solution_text,
                                    strip_markers, unwrap)

_log = logging.getLogger("cca_fast.data")

#: How the strict folder loader names the way out (API keyword and CLI flag).
SKIP_HINT = ("to load the other templates and report each bad one instead, pass "
             "skip_bad_templates=True (CLI: --skip-bad-templates)")

_SECTION = re.compile(r"^\s*#\s*(init|conditions|answer)\b\s*(.*)$", re.IGNORECASE)
_TARGETS = re.compile(r"^\s*(\$?\s*[A-Za-z_]\w*(?:\s*,\s*\$?\s*[A-Za-z_]\w*)*)\s*=(?!=)\s*(.+)$")
_QUESTION_SLOT = re.compile(r"\{\s*([A-Za-z_]\w*)\s*(?:,([^{}]*))?\}")
_SOLUTION_SLOT = re.compile(r"\{([^{}]+)\}")

#: Largest domain scanned when looking a default's text up among labelled items.
_MAX_LOOKUP = 100_000


@dataclass(frozen=True)
class InitLine:
    """One ``#init`` line: ``targets`` (``numeric`` marks ``$`` names) drawn from ``expr``."""

    targets: tuple[str, ...]
    numeric: tuple[bool, ...]
    line: int
    expr: Expression


@dataclass(frozen=True)
class Condition:
    """One ``#conditions`` line (a boolean expression) and its line number."""

    line: int
    expr: Expression


@dataclass(frozen=True)
class _Slot:
    """A placeholder in question or solution text."""

    expr: Expression
    bare_name: str | None  # the variable when the placeholder is just a name


@dataclass(frozen=True)
class Template:
    """A parsed template.

    Attributes:
        id: template id (``"0042"``).
        question_parts / solution_parts: text split into literal strings and placeholders.
        init: the ``#init`` lines in order; ``conditions``; ``answer`` (the ``#answer``).
        defaults: each variable's default text from the first ``{var,default}`` placeholder.
        original_question / original_answer: the source problem, when the file has one.
        path: the file it came from, if any.
    """

    id: str
    question_parts: tuple[str | _Slot, ...]
    init: tuple[InitLine, ...]
    conditions: tuple[Condition, ...]
    answer: Expression
    solution_parts: tuple[str | _Slot, ...]
    defaults: Mapping[str, str]
    original_question: str = ""
    original_answer: str = ""
    path: str | None = None

    @property
    def variables(self) -> tuple[str, ...]:
        """Every variable, in ``#init`` order."""
        return tuple(t for line in self.init for t in line.targets)


@dataclass(frozen=True)
class InstantiateConfig:
    """Knobs of :func:`instantiate`.

    Attributes:
        max_tries: draws allowed per instance before giving up with a ``TemplateError``.
        integer_answers: also require the ``#answer`` to be an integer (GSM8K answers are).
        distinct: reject draws whose numeric bindings repeat an earlier instance ...
        max_duplicate_streak: ... until this many repeats in a row (the numeric space looks
            exhausted); then accept draws whose text values differ; after as many more
            repeats the space is too small: it is enumerated when small enough, else a
            ``TemplateError`` says so (identical instances are never repeated silently).
        answer_mismatch: what to do when the solution's ``#### {expr}`` disagrees with
            ``#answer`` (an upstream template bug, e.g. GSM-Symbolic 0062): ``"use_solution"``
            (gold = the solution's number, which is what the text derives; the instance's
            ``answer_mismatch`` records ``#answer``'s value) or ``"error"``.
        allow_duplicates: when the space has fewer distinct instances than asked for, repeat
            instances (with a warning) instead of raising ``TemplateError`` (repeats put
            identical problems in the training and the test split).
        limits: the cost budget of each expression evaluation (:class:`EvalLimits`).
        max_seconds: wall-clock budget per template (sampling and enumeration together).
        progress_every: log a progress line (logger ``cca_fast.data``, level WARNING) every
            this many seconds while a template is still sampling.
        max_enumerate: when the sampler runs out of tries, spaces with at most this many draws
            are enumerated: the missing instances are taken from the enumeration, or the error
            says exactly why the space is empty or too small.
    """

    max_tries: int = 200_000
    integer_answers: bool = True
    distinct: bool = True
    max_duplicate_streak: int = 2_000
    answer_mismatch: str = "use_solution"
    allow_duplicates: bool = False
    limits: EvalLimits = field(default_factory=EvalLimits)
    max_seconds: float = 300.0
    progress_every: float = 10.0
    max_enumerate: int = 200_000

    def __post_init__(self) -> None:
        if not isinstance(self.limits, EvalLimits):
            raise TemplateError(f"limits must be an EvalLimits, got {type(self.limits).__name__}")
        if not (self.max_seconds > 0 and self.progress_every > 0) or self.max_enumerate < 0:
            raise TemplateError("max_seconds and progress_every must be > 0 and max_enumerate >= 0")
        if self.answer_mismatch not in ("use_solution", "error"):
            raise TemplateError(f"answer_mismatch must be 'use_solution' or 'error', "
                                f"got {self.answer_mismatch!r}")
        if self.max_tries < 1 or self.max_duplicate_streak < 0:
            raise TemplateError("max_tries must be >= 1 and max_duplicate_streak >= 0")


@dataclass(frozen=True)
class Instance:
    """One instantiated template: bindings, rendered texts and the exact answer.

    ``answer_mismatch`` is ``None``, or ``#answer``'s value when it disagreed with the
    solution's final number (which is then ``value``).
    """

    bindings: Mapping[str, Any]
    question: str
    answer: str
    value: Any = field(compare=False)
    answer_mismatch: Any = field(default=None, compare=False)


# ----------------------------------------------------------------------------- parsing


def parse_template(data: Mapping[str, Any], template_id: str, path: str | None = None) -> Template:
    """Parse one template object (the JSON of a GSM-Symbolic template file).

    Raises:
        TemplateError: naming the template, the line and the problem.
    """
    tag = f"template {template_id}"
    for key in ("question_annotated", "answer_annotated"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise TemplateError(f"{tag}: missing or empty field '{key}' (a template needs "
                                "'question_annotated' and 'answer_annotated')")
    lines = data["question_annotated"].splitlines()
    body: list[str] = []
    section: str | None = None
    raw_init: list[tuple[int, str]] = []
    raw_conditions: list[tuple[int, str]] = []
    raw_answer: tuple[int, str] | None = None
    for no, text in enumerate(lines, start=1):
        m = _SECTION.match(text)
        if m:
            section = m.group(1).lower()
            rest = m.group(2).strip()
            if section == "answer":
                if raw_answer is not None:
                    raise TemplateError(f"{tag}, line {no}: a second #answer line")
                raw_answer = (no, _answer_source(rest))
            elif rest.lstrip(":").strip():
                raise TemplateError(f"{tag}, line {no}: unexpected text after #{section}: {rest!r}")
            continue
        if section is None:
            body.append(text)
            continue
        if not text.strip():
            continue
        item = text.strip()
        if section == "answer":
            raise TemplateError(f"{tag}, line {no}: unexpected line after #answer: {item!r}")
        if not item.startswith("-"):
            raise TemplateError(f"{tag}, line {no}: #{section} lines must start with '- ': {item!r}")
        (raw_init if section == "init" else raw_conditions).append((no, item[1:].strip()))
    if raw_answer is None:
        raise TemplateError(f"{tag}: no '#answer: <expr>' line in question_annotated")
    if not raw_init:
        raise TemplateError(f"{tag}: no #init section (nothing to instantiate)")

    init: list[InitLine] = []
    known: set[str] = set(POOLS)
    variables: list[str] = []
    for no, text in raw_init:
        m = _TARGETS.match(text)
        if not m:
            raise TemplateError(f"{tag}, line {no} (#init): expected 'name = domain' or "
                                f"'a, b = sample(seq, 2)', got {text!r}")
        names = [t.strip() for t in m.group(1).split(",")]
        targets = tuple(strip_markers(t).replace(" ", "") for t in names)
        for t in targets:
            if t.startswith("_"):
                raise TemplateError(f"{tag}, line {no} (#init): variable names may not start "
                                    f"with '_': {t!r}")
            if t in variables:
                raise TemplateError(f"{tag}, line {no} (#init): variable '{t}' defined twice")
        expr = compile_expression(m.group(2), f"{tag}, line {no} (#init)", allow_init=True,
                                  known_names=known | set(variables))
        init.append(InitLine(targets, tuple(n.startswith("$") for n in names), no, expr))
        variables.extend(targets)
    known |= set(variables)
    conditions = tuple(
        Condition(no, compile_expression(text, f"{tag}, line {no} (#conditions)", known_names=known))
        for no, text in raw_conditions)
    ans_no, ans_text = raw_answer
    answer = compile_expression(ans_text, f"{tag}, line {ans_no} (#answer)", known_names=known)

    question_text = "\n".join(body).strip()
    question_parts, defaults = _parse_question(question_text, tag, set(variables))
    solution_parts = _parse_solution(data["answer_annotated"].strip(), tag, known)
    return Template(
        id=template_id, question_parts=question_parts, init=tuple(init), conditions=conditions,
        answer=answer, solution_parts=solution_parts, defaults=MappingProxyType(defaults),
        original_question=str(data.get("question", "")), original_answer=str(data.get("answer", "")),
        path=path)


def _answer_source(rest: str) -> str:
    text = rest.strip()
    if text.startswith((":", "=")):
        text = text[1:].strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1].strip()
    return text


def _parse_question(text: str, tag: str, variables: set[str]) -> tuple[tuple[str | _Slot, ...], dict[str, str]]:
    parts: list[str | _Slot] = []
    defaults: dict[str, str] = {}
    pos = 0
    for m in _QUESTION_SLOT.finditer(text):
        name, default = m.group(1), m.group(2)
        if name not in variables:
            line = text.count("\n", 0, m.start()) + 1
            raise TemplateError(f"{tag}, question line {line}: placeholder {{{m.group(0)[1:-1]}}} "
                                f"uses undefined variable '{name}' (not bound in #init)")
        parts.append(text[pos:m.start()])
        expr = compile_expression(name, f"{tag}, question", known_names=variables)
        parts.append(_Slot(expr, name))
        if default is not None and default.strip() and name not in defaults:
            defaults[name] = default.strip()
        pos = m.end()
    parts.append(text[pos:])
    return tuple(p for p in parts if p != ""), defaults


def _parse_solution(text: str, tag: str, known: set[str]) -> tuple[str | _Slot, ...]:
    parts: list[str | _Slot] = []
    pos = 0
    for m in _SOLUTION_SLOT.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        src = m.group(1).strip()
        expr = compile_expression(src, f"{tag}, answer_annotated line {line}", known_names=known)
        bare = src if re.fullmatch(r"\$?[A-Za-z_]\w*", src) else None
        parts.append(text[pos:m.start()])
        parts.append(_Slot(expr, strip_markers(bare) if bare else None))
        pos = m.end()
    parts.append(text[pos:])
    if "####" not in text:
        raise TemplateError(f"{tag}: answer_annotated has no final '#### {{answer}}' line")
    return tuple(p for p in parts if p != "")


def load_template(path: str | Path) -> Template:
    """Read and parse one template ``.json`` file (id: its ``id`` field, else the file stem)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"template file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read template {p}: {e}") from None
    if not isinstance(data, dict):
        raise TemplateError(f"{p}: a template file must hold one JSON object, got {type(data).__name__}")
    template_id = str(data["id"]) if data.get("id") not in (None, "") else p.stem
    try:
        return parse_template(data, template_id, str(p))
    except TemplateError as e:
        raise TemplateError(f"{p}: {e}") from None


#: ``(path or template id, reason)`` of a template left out by a lenient loader.
SkipReport = Callable[[str, str], None]


def load_template_dir(directory: str | Path, *, skip_bad: bool = False,
                      on_skip: SkipReport | None = None) -> list[Template]:
    """Parse every ``*.json`` template in ``directory`` (sorted by file name).

    Args:
        skip_bad: leave out templates that cannot be read or parsed (or whose id repeats an
            earlier one) instead of raising; each is reported to ``on_skip(path, reason)``
            (default: a WARNING on logger ``cca_fast.data``).

    Raises:
        DataError / TemplateError: the first bad template (strict mode; the message names the
            file, the cause and the ``skip_bad_templates`` way out), or no template is left.
    """
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"template folder not found: {d}")
    files = sorted(d.glob("*.json"))
    if not files:
        raise DataError(f"no template .json files in {d}")
    report = on_skip or _log_skip
    templates: list[Template] = []
    seen: dict[str, str] = {}
    for f in files:
        try:
            t = load_template(f)
            if t.id in seen:
                raise TemplateError(f"template id '{t.id}' used by both {seen[t.id]} and {t.path}; "
                                    "give each template a unique 'id' (or file name)")
        except CCAError as e:
            if not skip_bad:
                raise type(e)(f"{e}\n(in template folder {d}: {SKIP_HINT})") from None
            report(str(f), str(e))
            continue
        seen[t.id] = str(t.path)
        templates.append(t)
    if not templates:
        raise DataError(f"no usable template in {d}: all {len(files)} were skipped as bad")
    return templates


def _log_skip(where: str, reason: str) -> None:
    _log.warning("skipped bad template %s: %s", where, reason)


# ----------------------------------------------------------------------------- evaluation


def _env(bindings: Mapping[str, Any], rng: random.Random | None = None) -> dict[str, Any]:
    env: dict[str, Any] = dict(POOLS)
    env.update(bindings)
    if rng is not None:
        env[RNG_KEY] = rng
    return env


def failed_conditions(template: Template, bindings: Mapping[str, Any]) -> list[Condition]:
    """The conditions that ``bindings`` violate (empty when all hold)."""
    env = _env(bindings)
    return [c for c in template.conditions if not c.expr.holds(env)]


def evaluate_answer(template: Template, bindings: Mapping[str, Any]) -> Any:
    """The exact value of ``#answer`` (int or Fraction) for ``bindings``."""
    return unwrap(template.answer.evaluate(_env(bindings)))


def _render(parts: Sequence[str | _Slot], env: Mapping[str, Any], question: bool) -> str:
    out: list[str] = []
    for p in parts:
        if isinstance(p, str):
            out.append(p)
            continue
        value = p.expr.evaluate(env)
        if question:
            out.append(display_text(value))
        elif p.bare_name is not None or not isinstance(value, Labelled):
            out.append(solution_text(value))
        else:
            out.append(format_number(value))
    return "".join(out)


def render_question(template: Template, bindings: Mapping[str, Any]) -> str:
    """Question text with each ``{var,default}`` replaced by the bound value's text."""
    return _render(template.question_parts, _env(bindings), question=True)


def render_solution(template: Template, bindings: Mapping[str, Any]) -> str:
    """Solution text with every ``{expr}`` evaluated (``<<..>>`` annotations kept)."""
    return _render(template.solution_parts, _env(bindings), question=False)


def final_answer_text(solution: str) -> str:
    """The text after the last ``####`` of a solution."""
    return solution.rsplit("####", 1)[1].strip() if "####" in solution else ""


# ----------------------------------------------------------------------------- domains


@dataclass
class _Domain:
    """How one ``#init`` line produces values; static domains are evaluated once."""

    line: InitLine
    static: bool
    value: Draw | None = None  # the evaluated domain when static

    def draw(self, rng: random.Random, env: Mapping[str, Any]) -> tuple[Any, ...]:
        d = self.value if self.static else _as_draw(self.line.expr.evaluate(env), self.line)
        items = d.items
        if d.k is None:
            return (items[rng.randrange(len(items))],)
        if d.sequential:
            start = rng.randrange(len(items) - d.k + 1)
            return tuple(items[start:start + d.k])
        return tuple(items[i] for i in rng.sample(range(len(items)), d.k))


def _as_draw(raw: Any, line: InitLine) -> Draw:
    where = line.expr.where
    n = len(line.targets)
    if isinstance(raw, Draw):
        d = raw
    elif isinstance(raw, (list, tuple, range)):
        d = Draw(raw)
    else:
        d = Draw([raw])  # a constant
    if len(d.items) == 0:
        raise TemplateError(f"{where}: empty domain `{line.expr.source}`")
    if not isinstance(d.items, range):  # (label, number) pairs -> Labelled, floats -> exact
        d = Draw([labelled_item(x) for x in d.items], d.k, d.sequential)
    got = 1 if d.k is None else d.k
    if got != n:
        raise TemplateError(f"{where}: {n} variable(s) {', '.join(line.targets)} but the domain "
                            f"`{line.expr.source}` gives {got} value(s); use sample(seq, {n}) "
                            "for several distinct values")
    return d


def _domains(template: Template, rng: random.Random) -> list[_Domain]:
    variables = set(template.variables)
    out: list[_Domain] = []
    env = _env({}, rng)
    for line in template.init:
        if set(line.expr.names) & variables:
            out.append(_Domain(line, static=False))
        else:
            out.append(_Domain(line, static=True, value=_as_draw(line.expr.evaluate(env), line)))
    return out


def _condition_schedule(template: Template) -> tuple[list[Condition], list[list[Condition]]]:
    """Conditions to test before any draw, and after each #init line (once all their
    variables are bound)."""
    position = {t: i for i, line in enumerate(template.init) for t in line.targets}
    upfront: list[Condition] = []
    after: list[list[Condition]] = [[] for _ in template.init]
    for c in template.conditions:
        idx = [position[n] for n in c.expr.names if n in position]
        (after[max(idx)] if idx else upfront).append(c)
    return upfront, after


def default_bindings(template: Template) -> dict[str, Any] | None:
    """Bindings from the ``{var,default}`` placeholders (the original problem's values), or
    ``None`` when some variable has no default. Texts such as ``"twice"`` or ``"1/2"`` become
    labelled numbers, matched against the variable's domain where possible."""
    rng = random.Random(0)
    env = _env({}, rng)
    variables = set(template.variables)
    out: dict[str, Any] = {}
    for line in template.init:
        items: Sequence[Any] = ()
        if not set(line.expr.names) & variables:
            d = _as_draw(line.expr.evaluate(env), line)
            if len(d.items) <= _MAX_LOOKUP:
                items = list(d.items)
        for name, numeric in zip(line.targets, line.numeric):
            text = template.defaults.get(name)
            if text is None:
                return None
            out[name] = _default_value(text, numeric, items)
    return out


def _default_value(text: str, numeric: bool, items: Sequence[Any]) -> Any:
    key = text.strip().lower()
    for item in items:
        if isinstance(item, Labelled) and item.text.strip().lower() == key:
            return item
    has_labels = any(isinstance(i, Labelled) for i in items)
    if numeric or has_labels or any(is_number(i) for i in items):
        number = parse_number_text(text)
        if number is not None:
            return Labelled(text, number) if has_labels else number
    return text


# ----------------------------------------------------------------------------- instantiation


def _binding_key(bindings: Mapping[str, Any]) -> tuple[Any, ...]:
    def freeze(v: Any) -> Any:
        return tuple(freeze(x) for x in v) if isinstance(v, (list, tuple)) else v
    numeric = tuple((k, freeze(v)) for k, v in bindings.items()
                    if not isinstance(v, str))
    return numeric or tuple(bindings.items())


def _tag(template: Template) -> str:
    return f"template {template.id}" + (f" ({template.path})" if template.path else "")


def sample_instances(template: Template, n: int, seed: int,
                     config: InstantiateConfig | None = None) -> list[Instance]:
    """Draw ``n`` instances satisfying every condition (deterministic in ``seed``).

    Rejection sampling; when ``config.max_tries`` draws in a row give no new instance, a space
    of at most ``config.max_enumerate`` draws is enumerated and the missing instances are
    taken from it. Every expression runs under ``config.limits`` and the whole template under
    ``config.max_seconds``.

    Raises:
        TemplateError: naming the template (id and file) and the cause: the space is empty
            (e.g. ``#answer`` is never an integer), has fewer distinct instances than ``n``,
            the sampler ran out of tries on a space too large to enumerate, the time budget ran
            out, or an expression failed / went over its budget (with its line).
    """
    cfg = config or InstantiateConfig()
    if n < 0:
        raise TemplateError(f"template {template.id}: number of instances must be >= 0, got {n}")
    with eval_limits(cfg.limits):
        try:
            found = _sample(template, n, seed, cfg)
            _warn_mismatches(template, found)
            return found
        except TemplateError as e:
            if template.path and template.path not in str(e):
                raise TemplateError(f"{template.path}: {e}") from None
            raise


class _Clock:
    """The per-template time budget, with progress lines for slow templates."""

    def __init__(self, template: Template, n: int, cfg: InstantiateConfig) -> None:
        self.template, self.n, self.cfg = template, n, cfg
        self.start = time.monotonic()
        self.next_report = self.start + cfg.progress_every
        self.draws = 0

    def tick(self, found: int, fails: Mapping[str, int]) -> None:
        self.draws += 1
        now = time.monotonic()
        if now < self.next_report and now - self.start <= self.cfg.max_seconds:
            return
        elapsed = now - self.start
        if elapsed > self.cfg.max_seconds:
            raise TemplateError(
                f"{_tag(self.template)}: gave up after {elapsed:.1f} s ({self.draws} draws, "
                f"{found} of {self.n} instances found; limit InstantiateConfig.max_seconds="
                f"{self.cfg.max_seconds}) ({_fail_detail(fails)}). Fix: relax the #conditions or "
                "make the dynamic #init domains smaller, ask for fewer instances, or raise "
                "max_seconds.")
        _log.warning("%s: still sampling after %.0f s: %d of %d instances, %d draws (gives up "
                     "after max_seconds=%s)", _tag(self.template), elapsed, found, self.n,
                     self.draws, self.cfg.max_seconds)
        self.next_report = now + self.cfg.progress_every


def _bump(fails: dict[str, int], key: str) -> None:
    fails[key] = fails.get(key, 0) + 1


_NOT_INTEGER = "#answer is not an integer"


def _judge_answer(template: Template, env: Mapping[str, Any], cfg: InstantiateConfig,
                  fails: dict[str, int]) -> Any:
    """``#answer``'s value for this draw, or ``None`` (the reason counted in ``fails``).
    Budget overruns and type errors raise: they are template bugs, not unlucky draws."""
    src = template.answer.source
    try:
        value = unwrap(template.answer(env))
    except _EvalFailure as e:  # e.g. division by zero for these values: reject the draw
        _bump(fails, f"#answer `{src}`: {e}")
        return None
    if not is_number(value):
        _bump(fails, f"#answer `{src}` gives {type(value).__name__} {str(value)[:30]!r}, not a number")
        return None
    if cfg.integer_answers and isinstance(value, Fraction):
        _bump(fails, _NOT_INTEGER)
        return None
    return value


def _sample(template: Template, n: int, seed: int, cfg: InstantiateConfig) -> list[Instance]:
    rng = random.Random(f"cca_fast:{seed}:{template.id}")
    domains = _domains(template, rng)
    upfront, after = _condition_schedule(template)
    env = _env({}, rng)
    for c in upfront:
        if not c.expr.holds(env):
            raise TemplateError(f"{c.expr.where}: condition `{c.expr.source}` is always false")
    fails: dict[str, int] = {}
    found: list[Instance] = []
    seen: set[tuple[Any, ...]] = set()
    seen_full: set[tuple[Any, ...]] = set()
    tries = dup_streak = 0
    clock = _Clock(template, n, cfg)
    while len(found) < n:
        if tries >= cfg.max_tries:
            return _finish(template, n, found, seen_full, fails, tries, cfg, rng, clock, "tries")
        tries += 1
        clock.tick(len(found), fails)
        ok = True
        for dom, checks in zip(domains, after):
            for name, value in zip(dom.line.targets, dom.draw(rng, env)):
                env[name] = value
            for c in checks:
                if not c.expr.holds(env):
                    _bump(fails, c.expr.source)
                    ok = False
                    break
            if not ok:
                break
        if not ok:
            continue
        bindings = {name: env[name] for name in template.variables}
        value = _judge_answer(template, env, cfg, fails)
        if value is None:
            continue
        key, full_key = _binding_key(bindings), tuple(bindings.items())
        if cfg.distinct and key in seen:
            # numeric values repeat: retry; once that space looks exhausted accept new text
            # values (names, ...); after as many more tries the space is too small
            dup_streak += 1
            if dup_streak <= cfg.max_duplicate_streak:
                continue
            if full_key in seen_full:
                if dup_streak <= 2 * cfg.max_duplicate_streak:
                    continue
                if not cfg.allow_duplicates:
                    return _finish(template, n, found, seen_full, fails, tries, cfg, rng, clock,
                                   "duplicates")
        instance = _make_instance(template, bindings, value, env, cfg)
        found.append(instance)
        seen.add(key)
        seen_full.add(full_key)
        tries = dup_streak = 0
    _warn_repeats(template, found)
    return found


def _warn_mismatches(template: Template, found: Sequence[Instance]) -> None:
    """Report (logger ``cca_fast.data``, WARNING) instances whose ``#answer`` disagreed with the
    solution's ``#### {...}`` line (``answer_mismatch="use_solution"`` took the solution's number):
    never silently, since one of the two lines of the template is wrong."""
    bad = [inst for inst in found if inst.answer_mismatch is not None]
    if bad:
        _log.warning("%s: in %d of %d instances the solution's final '#### %s' disagrees with #answer = %s (gold "
                     "taken from the solution's line, #answer's value kept in meta['answer_mismatch']): fix the "
                     "template's #answer or its '####' line, or pass InstantiateConfig(answer_mismatch='error') to "
                     "refuse it", _tag(template), len(bad), len(found), format_number(bad[0].value),
                     format_number(bad[0].answer_mismatch))


def _warn_repeats(template: Template, found: Sequence[Instance]) -> None:
    distinct = len({inst.question for inst in found})
    if distinct < len(found):
        _log.warning("%s: only %d distinct questions among %d instances (allow_duplicates / "
                     "distinct=False): identical problems can land in both training and test",
                     _tag(template), distinct, len(found))


class _TooLarge(Exception):
    """Internal: the space has more draws than ``max_enumerate``."""


@dataclass
class _Census:
    """What enumerating a template's whole space found."""

    draws: int = 0
    valid: list[tuple[dict[str, Any], Any, dict[str, Any]]] = field(default_factory=list)
    fails: dict[str, int] = field(default_factory=dict)


def _choices(d: Draw) -> Iterator[tuple[Any, ...]]:
    items = d.items
    if d.k is None:
        return ((x,) for x in items)
    if d.sequential:
        return (tuple(items[i:i + d.k]) for i in range(len(items) - d.k + 1))
    return itertools.permutations(items, d.k)


def _enumerate(template: Template, cfg: InstantiateConfig, clock: _Clock,
               found: int) -> _Census:
    """Every draw of the template's space (raises ``_TooLarge`` past ``max_enumerate``)."""
    rng = random.Random(0)
    domains = _domains(template, rng)
    _, after = _condition_schedule(template)
    env = _env({}, rng)
    census = _Census()
    seen: set[tuple[Any, ...]] = set()
    budget = [cfg.max_enumerate]

    def visit(i: int) -> None:
        if i == len(domains):
            bindings = {name: env[name] for name in template.variables}
            value = _judge_answer(template, env, cfg, census.fails)
            full_key = tuple(bindings.items())
            if value is not None and full_key not in seen:
                seen.add(full_key)
                census.valid.append((bindings, value, dict(env)))
            return
        dom = domains[i]
        d = dom.value if dom.static else _as_draw(dom.line.expr.evaluate(env), dom.line)
        for combo in _choices(d):
            budget[0] -= 1
            if budget[0] < 0:
                raise _TooLarge
            clock.tick(found, census.fails)
            census.draws += 1
            for name, value in zip(dom.line.targets, combo):
                env[name] = value
            if all(_holds_counted(c, env, census.fails) for c in after[i]):
                visit(i + 1)

    visit(0)
    return census


def _holds_counted(c: Condition, env: Mapping[str, Any], fails: dict[str, int]) -> bool:
    if c.expr.holds(env):
        return True
    _bump(fails, c.expr.source)
    return False


def _finish(template: Template, n: int, found: list[Instance], seen_full: set[tuple[Any, ...]],
            fails: dict[str, int], tries: int, cfg: InstantiateConfig, rng: random.Random,
            clock: _Clock, why: str) -> list[Instance]:
    """The sampler found no new instance for a long while: enumerate a small space to finish
    from it, or say exactly why there are not enough instances."""
    tag = _tag(template)
    try:
        census = _enumerate(template, cfg, clock, len(found))
    except _TooLarge:
        if why == "tries":
            raise TemplateError(_exhausted(template, len(found), n, tries, fails) + (
                f" (The space has more than max_enumerate={cfg.max_enumerate} draws, too many "
                "to enumerate; raising InstantiateConfig.max_tries may also help.)")) from None
        raise TemplateError(
            f"{tag}: found only {len(found)} distinct instances of {n} asked for; the last "
            f"{2 * cfg.max_duplicate_streak} draws all repeated one of them, so the space looks too "
            "small (it has more than max_enumerate draws to count exactly). Fix: ask for fewer "
            "instances (--n-per-template), widen the #init domains, or allow repeats with "
            "InstantiateConfig(allow_duplicates=True).") from None
    if not census.valid:
        raise TemplateError(_empty_message(template, census, len(found), n))
    new = [v for v in census.valid if tuple(v[0].items()) not in seen_full]
    missing = n - len(found)
    if len(new) < missing and not cfg.allow_duplicates:
        k = len(census.valid)
        raise TemplateError(
            f"{tag}: found only {len(found)} of {n} instances: the template's domain is too "
            f"small: only {k} distinct instance(s) exist (its whole space enumerated, "
            f"{census.draws} values tried) but {n} were asked for; repeating them would put identical problems "
            f"in both the training and the test split. Fix: ask for at most {k} "
            f"(--n-per-template {k}), widen the #init domains, or allow repeats with "
            "InstantiateConfig(allow_duplicates=True).")
    rng.shuffle(new)
    picked = new[:missing]
    while len(picked) < missing:  # allow_duplicates: repeat valid instances
        picked.append(census.valid[rng.randrange(len(census.valid))])
    for bindings, value, env in picked:
        env[RNG_KEY] = rng
        found.append(_make_instance(template, bindings, value, env, cfg))
    _warn_repeats(template, found)
    return found


def _empty_message(template: Template, census: _Census, got: int, n: int) -> str:
    tag = f"{_tag(template)}: found only {got} of {n} instances"
    non_int = census.fails.get(_NOT_INTEGER, 0)
    others = {k: v for k, v in census.fails.items() if k != _NOT_INTEGER}
    if non_int:
        return (f"{tag}: the space is empty: every one of the {non_int} draws that satisfy the "
                f"#conditions gives a non-integer #answer `{template.answer.source}`, and "
                "integer answers are required (GSM8K answers are integers). Fix: change the "
                "#init domains or #conditions so that #answer is an integer, or allow "
                "non-integer answers with InstantiateConfig(integer_answers=False) "
                "(CLI: --non-integer-answers).")
    return (f"{tag}: the space is empty: no draw (its whole space enumerated, "
            f"{census.draws} values tried) satisfies every #condition and gives a numeric #answer "
            f"({_fail_detail(others)}). Fix: widen the #init domains, relax the #conditions or "
            "correct the #answer expression.")


def _fail_detail(fails: Mapping[str, int]) -> str:
    worst = sorted(fails.items(), key=lambda kv: -kv[1])[:3]
    return "; ".join(f"`{src}` failed {count} times" if not src.startswith("#answer")
                     else f"{src} ({count} times)" for src, count in worst) or "no failures"


def _make_instance(template: Template, bindings: dict[str, Any], value: Any,
                   env: Mapping[str, Any], cfg: InstantiateConfig) -> Instance:
    question = _render(template.question_parts, env, question=True)
    solution = _render(template.solution_parts, env, question=False)
    final = final_answer_text(solution)
    expected = format_number(value)
    if final == expected:
        return Instance(MappingProxyType(dict(bindings)), question, solution, value)
    num = parse_number_text(final)
    if num is not None and Fraction(num) == Fraction(value):  # same number, other spelling
        solution = solution[: solution.rindex("####")] + f"#### {expected}"
        return Instance(MappingProxyType(dict(bindings)), question, solution, value)
    message = (f"template {template.id}: the solution's final '#### {final}' disagrees with "
               f"#answer = {expected} for bindings {encode_bindings(bindings)}")
    if cfg.answer_mismatch == "error" or num is None:
        raise TemplateError(message + ("" if num is not None else
                                       " (and the solution's final text is not a number)"))
    return Instance(MappingProxyType(dict(bindings)), question, solution, num, answer_mismatch=value)


def _exhausted(template: Template, got: int, n: int, tries: int, fails: Mapping[str, int]) -> str:
    return (f"{_tag(template)}: found only {got} of {n} instances: the sampler ran out of tries "
            f"({tries} draws in a row gave no new valid instance: {_fail_detail(fails)}). Widen "
            "the #init domains or relax the #conditions, or ask for fewer instances.")


def instantiate(template: Template, n: int, seed: int, *, source: str = "sym",
                config: InstantiateConfig | None = None) -> list[Problem]:
    """``n`` seeded :class:`Problem` s from ``template``.

    ``Problem.id`` is ``f"{source}-{template.id}-{i}"``, ``template`` the template id, ``gold``
    the float of ``#answer``; ``meta`` holds the JSON-encoded bindings (:func:`decode_bindings`
    reverses it), the source and the seed. Same seed -> identical problems.
    """
    problems = []
    for i, inst in enumerate(sample_instances(template, n, seed, config)):
        problems.append(Problem(
            id=f"{source}-{template.id}-{i}", question=inst.question, answer=inst.answer,
            gold=float(inst.value), template=template.id, meta=_meta(inst, source, seed)))
    return problems


def _meta(inst: Instance, source: str, seed: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"bindings": encode_bindings(inst.bindings), "source": source,
                            "seed": seed}
    if inst.answer_mismatch is not None:
        meta["answer_mismatch"] = _encode(inst.answer_mismatch)
    return meta


# ----------------------------------------------------------------------------- JSON bindings


def _encode(v: Any) -> Any:
    if isinstance(v, Labelled):
        return {"label": v.text, "value": _encode(v.value)}
    if isinstance(v, Fraction):
        return {"fraction": f"{v.numerator}/{v.denominator}"}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    return v


def _decode(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"label", "value"}:
        return Labelled(v["label"], _decode(v["value"]))
    if isinstance(v, dict) and set(v) == {"fraction"}:
        return Fraction(v["fraction"])
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def encode_bindings(bindings: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-serialisable form of bindings (exact: fractions as ``{"fraction": "p/q"}``,
    labelled values as ``{"label": text, "value": ...}``)."""
    return {k: _encode(v) for k, v in bindings.items()}


def decode_bindings(data: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`encode_bindings`."""
    return {k: _decode(v) for k, v in data.items()}
