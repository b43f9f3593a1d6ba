"""Command-line flags built from a frozen dataclass's fields, and the dataclass built back from them.

The field ``x_y`` is the flag ``--x-y``: its default is the field's default and its help text the
field's ``help`` metadata (``arg``), so a value is written once, in the dataclass, and the command
line, the library and the tests share it (server/settings.py does the same for ``vqdiff serve``).
Optional metadata: ``flag`` (another flag name), ``choices`` (a sequence of allowed words, or a
mapping from the words to the field's values), ``metavar``. Types: int, float, str, bool (a
switch, default False), ``X | None`` and ``tuple[str, ...]`` (comma-separated on the command line).
The standard library only: ``vqdiff --help`` imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping


def arg(default=dataclasses.MISSING, help: str = "", **flag) -> dataclasses.Field:
    """A dataclass field with its flag's help text (and optional ``flag``, ``choices``, ``metavar``)."""
    return dataclasses.field(default=default, metadata={"help": help, **flag})


def help_of(cls, name: str) -> str:
    """A field's help text, % escaped for argparse."""
    return _field(cls, name).metadata.get("help", "").replace("%", "%%")


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def split_words(raw: str) -> tuple[str, ...]:
    """``"a, b,"`` -> ``("a", "b")``; ``""`` -> ``()``."""
    return tuple(w.strip() for w in raw.split(",") if w.strip())


def add_fields(parser: argparse.ArgumentParser, cls, *, skip=(), defaults: Mapping | None = None,
               unset: bool = False, unset_help: str = "") -> None:
    """One flag per field of ``cls`` but those in ``skip``. ``defaults`` replaces some fields' defaults
    (a command whose defaults differ from the dataclass's, e.g. a fine-tuning run); ``unset`` makes
    every flag default to None, "not given" (``given_fields``), with ``unset_help`` where the default
    would be named."""
    defaults = defaults or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        base = _base(hints[f.name])
        choices = f.metadata.get("choices")
        default = defaults.get(f.name, f.default)
        kw: dict = {"dest": f.name}
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        if default is dataclasses.MISSING and not unset:
            kw["required"] = True
        if base is bool and not isinstance(choices, Mapping):
            if default not in (False, dataclasses.MISSING) and not unset:
                raise TypeError(f"{cls.__name__}.{f.name}: a switch must default to False")
            kw.update(action="store_true", default=None if unset else False)
        else:
            if isinstance(choices, Mapping):
                kw.update(type=str, choices=list(choices))
                default = next((w for w, v in choices.items() if v == default), default)
            else:
                kw["type"] = split_words if base is tuple else base
                if choices:
                    kw["choices"] = list(choices)
            if base is tuple and isinstance(default, tuple):
                default = ",".join(default)
            kw["default"] = None if unset or default is dataclasses.MISSING else default
        help = f.metadata.get("help", "")
        d = kw.get("default")
        shown = unset_help if unset else ("" if d is None or d is False or d == "" else f"default: {d}")
        kw["help"] = (f"{help} ({shown})" if help and shown else help or shown).replace("%", "%%")
        parser.add_argument(flag_of(f), **kw)


def given_fields(cls, args: argparse.Namespace, skip=()) -> dict:
    """The values of ``cls``'s fields that the parsed command line holds (None: not given), as the
    dataclass takes them (choice words mapped back to values)."""
    out = {}
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if f.name in skip or v is None:
            continue
        choices = f.metadata.get("choices")
        out[f.name] = choices[v] if isinstance(choices, Mapping) else v
    return out


def from_args(cls, args: argparse.Namespace, **extra):
    """``cls`` from the parsed command line: its flags' values, then ``extra``."""
    return cls(**{**given_fields(cls, args), **extra})


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _field(cls, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _base(hint) -> type:
    """int for ``int | None``, tuple for ``tuple[str, ...]``, else the type itself."""
    if typing.get_origin(hint) is tuple:
        return tuple
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint
