"""Command-line options generated from the config dataclasses (and function signatures), so a
flag's default, type and help come from the one definition in the library.

    @app.command()
    @user_errors
    @options(TRAIN)                      # every TrainConfig field as --flag
    def train(model: str = typer.Argument(...), **opts): ...

A command receives the generated options in ``**opts`` under their field names; :meth:`Group.build`
turns them back into the config. Only what the command line spells differently is written here
(short flags, a renamed flag, a parser for a list or a number that may be an int or a fraction).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import typer

from gpconv.schema import field_docs

_UNSET = object()  # a Flag without a default of its own


@dataclass(frozen=True)
class Flag:
    """How one field is spelled on the command line, where that differs from the default rule
    (``field_name`` -> ``--field-name``, the field's own type and default)."""

    names: tuple[str, ...] = ()
    """Flag names, e.g. ("--targets", "-t"); default: --field-name."""
    cli_type: Any = None
    """The type the command line parses (e.g. List[str] or str), when the field's is not one it can."""
    parse: Callable[[Any], Any] | None = None
    """Turns the parsed value into the field's value (e.g. "0,1" -> (0, 1)); None passes it on."""
    help: str | None = None
    """Help text, when the field's documentation reads wrong on the command line."""
    default: Any = _UNSET
    """A command-line default that differs (required options: ...)."""
    param: str | None = None
    """The Python parameter name, when the field's name is taken (``train``: the command)."""


@dataclass(frozen=True)
class Group:
    """The options of one config dataclass on one command."""

    cls: type
    flags: dict[str, Flag] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None
    docs: dict[str, str] | None = None
    """Help per field (signature groups); default: the dataclass's field documentation."""
    prefix: str = ""
    """Prefix of the Python parameter names (two groups with a field of the same name)."""

    def fields(self) -> list[dataclasses.Field]:
        out = []
        for f in dataclasses.fields(self.cls):
            if f.name in self.exclude or (self.only is not None and f.name not in self.only):
                continue
            out.append(f)
        return out

    def param_name(self, name: str) -> str:
        flag = self.flags.get(name)
        return flag.param if flag is not None and flag.param else self.prefix + name

    def parameters(self) -> list[inspect.Parameter]:
        hints = typing.get_type_hints(self.cls)
        docs = self.docs if self.docs is not None else field_docs(self.cls)
        params = []
        for f in self.fields():
            flag = self.flags.get(f.name, Flag())
            default = _default(f) if flag.default is _UNSET else flag.default
            names = flag.names or (f"--{self.param_name(f.name).replace('_', '-')}",)
            annotation = flag.cli_type or _cli_type(hints[f.name])
            if annotation is bool and len(names) == 1 and "/" not in names[0] and default is True:
                names = (f"{names[0]}/--no-{names[0][2:]}",)  # a True default can be switched off
            help_text = flag.help if flag.help is not None else _help(docs.get(f.name, ""))
            opt = typer.Option(default, *names, help=help_text, show_default=default is not None and default is not ...)
            params.append(inspect.Parameter(self.param_name(f.name), inspect.Parameter.KEYWORD_ONLY,
                                            default=opt, annotation=annotation))
        return params

    def values(self, opts: dict) -> dict:
        """The fields' values from a command's ``opts`` (each flag's parser applied). An option
        left at None where the field's default is not None was not given: the field keeps its
        default (a command may show "not given" as None, e.g. to know whether any was given)."""
        out = {}
        for f in self.fields():
            v = opts[self.param_name(f.name)]
            flag = self.flags.get(f.name)
            if v is None and _default(f) is not None:
                continue
            if flag is not None and flag.parse is not None:
                v = flag.parse(v)
            out[f.name] = v
        return out

    def given(self, opts: dict) -> bool:
        """Was any of this group's options given (not None)?"""
        return any(opts[self.param_name(f.name)] is not None for f in self.fields())

    def build(self, opts: dict, **more):
        """The config from a command's ``opts``; ``more`` sets fields the command decides itself."""
        return self.cls(**{**self.values(opts), **more})


def options(*groups: Group) -> Callable:
    """Add every group's options to a command: its signature gains them as keyword-only
    parameters, and it receives their values in ``**opts``."""

    def wrap(fn):
        sig = inspect.signature(fn)
        own = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        extra = [p for g in groups for p in g.parameters()]
        taken = {p.name for p in own}
        clash = [p.name for p in extra if p.name in taken]
        if clash:
            raise TypeError(f"{fn.__name__}: generated options {clash} clash with its own parameters")

        @functools.wraps(fn)
        def command(*args, **kwargs):
            return fn(*args, **kwargs)

        command.__signature__ = sig.replace(parameters=own + extra)
        return command

    return wrap


def signature_group(fn: Callable, exclude: tuple[str, ...] = (), flags: dict[str, Flag] | None = None) -> Group:
    """A :class:`Group` from a function's keyword parameters (their defaults and annotations;
    help from the docstring's ``name: text`` lines)."""
    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    fields_ = []
    for p in sig.parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in exclude:
            continue
        fields_.append((p.name, hints.get(p.name, Any), dataclasses.field(default=p.default)))
    cls = dataclasses.make_dataclass(f"{fn.__name__}_options", fields_, frozen=True)
    return Group(cls, flags or {}, docs=_arg_docs(fn))


def _arg_docs(fn) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Args:`` section (continuation lines joined)."""
    out: dict[str, str] = {}
    current, in_args = None, False
    for line in (inspect.getdoc(fn) or "").splitlines():
        if line.strip() in ("Args:", "Arguments:"):
            in_args = True
        elif in_args and line and not line.startswith(" "):
            break  # the next section
        elif in_args and line.startswith("    ") and not line.startswith("        ") and ":" in line:
            current, text = (t.strip() for t in line.split(":", 1))
            out[current] = text
        elif in_args and current is not None and line.strip():
            out[current] += " " + line.strip()
    return out


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return ...


def _cli_type(hint):
    """A type Typer parses: ``X | None`` -> Optional[X]; anything else it cannot -> str."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and args[0] in (int, float, str, bool):
            return Optional[args[0]]
        return Optional[str]
    if hint in (int, float, str, bool):
        return hint
    if origin in (list, tuple, typing.Sequence):
        return List[str]
    return str


def _help(doc: str) -> str:
    """A field's documentation as help: its first sentence when the whole is long."""
    if len(doc) <= 160:
        return doc
    head, sep, _ = doc.partition(". ")
    return head + "." if sep else doc
