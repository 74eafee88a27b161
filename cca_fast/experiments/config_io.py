"""Typed configurations to and from plain dicts (``config.json``, ``study_config.json``, flags).

Every configuration of a run or a study is a dataclass, possibly holding other dataclasses
(``RunConfig.dcm`` is a :class:`~cca_fast.stages.localize.dcm.DCMConfig`). Two functions move
them to and from JSON-able dicts:

* :func:`to_dict`: the init fields, nested dataclasses as dicts, tuples as lists;
* :func:`from_dict`: a dict of *overrides* applied to a base instance (by default the class's
  defaults), nested dicts merged into the nested dataclasses, lists turned back into tuples
  where the field is a tuple; an unknown key raises :class:`~cca_fast.errors.CCAError` naming its
  path (``RunConfig.dcm.epoch``) and the nearest field names, before anything runs.

A complete dict (what :func:`to_dict` wrote) gives back an equal instance; a partial one (a
command line's flags) changes only the keys it names.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, TypeVar

from cca_fast.errors import CCAError

T = TypeVar("T")


def init_fields(cls_or_obj: Any) -> dict[str, dataclasses.Field]:
    """The fields of a dataclass that its constructor takes, by name."""
    return {f.name: f for f in dataclasses.fields(cls_or_obj) if f.init}


def to_dict(obj: Any) -> dict[str, Any]:
    """``obj`` (a dataclass instance) as a JSON-able dict of its init fields, recursively."""
    return {name: _plain(getattr(obj, name)) for name in init_fields(obj)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def unknown_key_error(where: str, key: str, known: typing.Iterable[str]) -> CCAError:
    """The error for a key that is not a field of ``where``, with the nearest field names."""
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else \
        f"known fields: {', '.join(sorted(known))}"
    return CCAError(f"{where} has no field {key!r}: {hint} (fix the key, or remove it)")


def from_dict(cls: type[T], data: dict[str, Any], *, base: T | None = None, where: str | None = None) -> T:
    """An instance of the dataclass ``cls``: ``base`` (default ``cls()``) with the fields named in
    ``data`` replaced. Nested dataclass fields take nested dicts (merged into the base's value);
    tuple fields take lists. Raises :class:`CCAError` on an unknown key or a non-dict value where
    a nested configuration is expected; the configuration's own checks run on construction.

    Args:
        cls: the dataclass.
        data: field name -> value (or a dict, for a nested dataclass field).
        base: the instance whose values the keys not in ``data`` keep.
        where: the name used in error messages (default ``cls.__name__``).
    """
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise CCAError(f"{where} must be a JSON object (a dict of field values), got {type(data).__name__}")
    fields = init_fields(cls)
    for key in data:
        if key not in fields:
            raise unknown_key_error(where, key, fields)
    hints = typing.get_type_hints(cls)
    base = cls() if base is None else base
    changes: dict[str, Any] = {}
    for key, value in data.items():
        hint = hints.get(key)
        nested = _dataclass_type(hint)
        if nested is not None:
            if isinstance(value, nested):
                changes[key] = value
            elif isinstance(value, dict):
                current = getattr(base, key)
                changes[key] = from_dict(nested, value, base=current if isinstance(current, nested) else None,
                                         where=f"{where}.{key}")
            else:
                raise CCAError(f"{where}.{key} must be a {nested.__name__} or a dict of its fields, "
                               f"got {type(value).__name__}")
        elif isinstance(value, list) and _is_tuple(hint):
            changes[key] = tuple(value)
        else:
            changes[key] = value
    return dataclasses.replace(base, **changes)


def _dataclass_type(hint: Any) -> type | None:
    """The dataclass named by a field's type hint (``X`` or ``X | None``), else ``None``."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _is_tuple(hint: Any) -> bool:
    if hint is tuple or typing.get_origin(hint) is tuple:
        return True
    return any(a is tuple or typing.get_origin(a) is tuple for a in typing.get_args(hint))
