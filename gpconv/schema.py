"""The config dataclasses as schemas: their fields, defaults and documentation are the one
definition that the Python API, the recipes and the command line read.

* :func:`field_docs` - each field's documentation (the string literal under it in the class);
* :func:`updated` - a config with some fields changed, unknown names refused in one line;
* :func:`validate` - a mapping of plain values (YAML, ``--set``) checked against a config
  class's annotations by pydantic and built into an instance.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import typing
from typing import Any, Iterable, Mapping

from .errors import GPConvError


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """Field name -> the string literal that follows the field in ``cls``'s body (and its bases')."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def defaults(cls, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """Field name -> default value of a config dataclass (None for a field without one)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = None
    return out


def unknown_key(where: str, key: str, known: Iterable[str], what: str = "key") -> GPConvError:
    """The one-line error for a name that is not a field, with the nearest field as a hint."""
    known = list(known)
    prefix = f"{where}." if where else ""
    hint = difflib.get_close_matches(key, known, n=1)
    extra = f"; did you mean {prefix}{hint[0]}?" if hint else f"; known: {', '.join(known)}"
    return GPConvError(f"unknown {what} {prefix}{key}{extra}")


def updated(config, changes: Mapping[str, Any], where: str = ""):
    """``dataclasses.replace(config, **changes)``, an unknown name refused in one line."""
    if not changes:
        return config
    names = [f.name for f in dataclasses.fields(config)]
    for k in changes:
        if k not in names:
            raise unknown_key(where, k, names, "option")
    return dataclasses.replace(config, **changes)


def coerce(cls, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``values`` checked by pydantic against ``cls``'s field annotations: ints become floats
    where floats are due, lists tuples; bools, ints and strings are not converted into each
    other (YAML already typed them). A name that is not a field, or a value of the wrong type, is
    one GPConvError line naming ``where.key``."""
    from pydantic import TypeAdapter, ValidationError  # (~0.2 s to import: only recipes and --set values need it)

    hints = _hints(cls)
    out = {}
    for k, v in values.items():
        if k not in hints:
            raise unknown_key(where, k, list(hints))
        try:
            out[k] = TypeAdapter(hints[k]).validate_python(v, strict=_strict(v))
        except ValidationError:
            raise GPConvError(f"{where}.{k}: {v!r} is not a valid value (expected {_show_type(hints[k])})") from None
    return out


def validate(cls, values: Mapping[str, Any], where: str):
    """``cls(**values)`` after :func:`coerce`; the class's own checks (``__post_init__``) then
    run as usual, and their message is prefixed with ``where``."""
    out = coerce(cls, values, where)
    try:
        return cls(**out)
    except GPConvError as e:
        raise GPConvError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise GPConvError(f"{where}: {e}") from None


def _strict(value) -> bool:
    # YAML gives bools, ints, floats and strings their own types: no "yes" for a bool or "3" for
    # an int; containers are validated leniently so that a YAML list can fill a tuple field
    return not isinstance(value, (list, tuple, dict))


@functools.cache
def _hints(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _show_type(hint) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
