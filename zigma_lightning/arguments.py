"""One line for command-line arguments the parser refused, worked out from what was given, not from the parser's
error text: the keys the parsers accept (``get_defaults``), the constructors' signatures and type hints, and
re-parsing (``parse_args``) without a suspect argument to find the one that was refused."""

from __future__ import annotations

import difflib
import importlib
import inspect
import types
import typing
from argparse import ArgumentError
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

OWN_FLAGS = {"config", "print_config", "help"}


def given_flags(args: Sequence[str]) -> list[tuple[int, str, str | None]]:
    """(position, dotted key, value or None) of every ``--key value`` / ``--key=value`` in ``args``; a ``+=`` append
    counts as its key."""
    flags = []
    for i, token in enumerate(args):
        if not token.startswith("--"):
            continue
        key, eq, value = token[2:].partition("=")
        if not eq:
            following = args[i + 1] if i + 1 < len(args) else None
            value = following if following is not None and not following.startswith("--") else None
        flags.append((i, key.removesuffix("+"), value))
    return flags


def without(args: Sequence[str], position: int) -> list[str]:
    """``args`` without the flag at ``position`` and its separate value."""
    token = args[position]
    separate = "=" not in token and position + 1 < len(args) and not args[position + 1].startswith("--")
    return [*args[:position], *args[position + 1 + separate :]]


def closest_key(key: str, known_keys: set[str]) -> str | None:
    """The known key closest to ``key``: among its siblings (same parent) when the parent is known, else any."""
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known_keys if k.rpartition(".")[0] == parent} if parent else {}
    if siblings:
        close = difflib.get_close_matches(leaf, list(siblings), n=1)
        return siblings[close[0]] if close else None
    close = difflib.get_close_matches(key, sorted(known_keys), n=1)
    return close[0] if close else None


def parameters_of(cls: Any) -> list[str]:
    """Keyword parameters of a class (a dataclass's fields); [] when it has no inspectable signature."""
    try:
        params = inspect.signature(cls).parameters.values()
    except (ValueError, TypeError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def type_hint(cls: Any, name: str) -> Any:
    """The type hint of parameter ``name`` of ``cls``'s constructor, or None."""
    try:
        return typing.get_type_hints(cls.__init__).get(name)
    except Exception:  # unresolvable string annotations: no hint rather than a crash while reporting an error
        return None


def class_of(hint: Any) -> type | None:
    """The class in ``X``, ``X | None`` or ``Optional[X]``, or None."""
    if isinstance(hint, type):
        return hint
    classes = [arg for arg in typing.get_args(hint) if isinstance(arg, type) and arg is not type(None)]
    return classes[0] if len(classes) == 1 else None


def import_class(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


class ArgumentDiagnosis:
    """Finds the argument a parser refused and says why in one line.

    ``parse``: the parser's ``parse_args`` (raises ``ArgumentError``); ``sub``: the subcommand; ``known_keys``: the
    dotted keys its parser accepts; ``classes``: the class behind each top-level group (``model``, ``trainer``, ...).
    """

    def __init__(self, parse: Callable[[list[str]], Any], sub: str, known_keys: set[str], classes: dict[str, type]):
        self.parse, self.sub, self.known_keys, self.classes = parse, sub, known_keys, classes

    def explain(self, args: Sequence[str]) -> str | None:
        """One line naming the refused argument, or None when no single given argument explains the failure."""
        args = list(args)
        flags = given_flags(args)
        for _, key, value in flags:
            if key == "config" and value is not None and not Path(value).is_file():
                return f"--config {value}: file not found"
        for position, key, _ in flags:
            if key not in self.known_keys and key not in OWN_FLAGS:
                return self.unknown_key(key, without(args, position))
        for position, key, value in flags:
            rest = without(args, position)
            if key not in OWN_FLAGS and self.parses(rest):
                return self.refused_value(key, value, rest)
        for _, key, value in flags:
            line = self.unknown_in_config(value, args) if key == "config" and value is not None else None
            if line is not None:
                return line
        return None

    def parses(self, args: list[str]) -> Any:
        try:
            return self.parse(args) or True
        except ArgumentError:
            return None

    def unknown_key(self, key: str, rest: list[str]) -> str:
        owner = self.owner_of(key)
        if owner is None:
            close = closest_key(key, self.known_keys)
            return f"unknown option --{key}" + (
                f"; did you mean --{close}?" if close else " (see --help for the options)"
            )
        name = key[len(owner) + 1 :].removeprefix("init_args.").split(".")[0]
        cls, path = self.class_at(owner, rest)
        accepted = parameters_of(cls) if cls is not None else []
        close = difflib.get_close_matches(name, accepted, n=1)
        hint = f"; did you mean {close[0]}?" if close else f" (accepted: {', '.join(accepted)})"
        return f"unknown key {name!r} in {owner} ({path}){hint}"

    def unknown_in_config(self, path: str, args: list[str]) -> str | None:
        """The first key of the YAML config ``path`` that the parser or the configured class does not accept."""
        try:
            tree = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            return None
        for key, value in self.config_entries(tree):
            if key not in self.known_keys:
                if self.owner_of(key):
                    return None
                close = closest_key(key, self.known_keys)
                return f"unknown key {key} in {path}" + (f"; did you mean {close}?" if close else "")
            if not isinstance(value, dict) or ("init_args" in value and "class_path" not in value):
                continue  # not a mapping, or init_args of a class another config names
            given = value.get("init_args", value)
            cls = import_class(value["class_path"]) if "class_path" in value else self.hinted_class(key)
            shown = value.get("class_path") or (f"{cls.__module__}.{cls.__qualname__}" if cls is not None else key)
            accepted = parameters_of(cls) if cls is not None and not takes_any_keyword(cls) else None
            for name in given if accepted else ():
                if name not in accepted and name not in ("class_path", "init_args", "dict_kwargs"):
                    close = difflib.get_close_matches(name, accepted, n=1)
                    hint = f"; did you mean {close[0]}?" if close else f" (accepted: {', '.join(accepted)})"
                    return f"unknown key {name!r} in {key} ({shown}){hint} in {path}"
        return None

    def config_entries(self, tree: Any, prefix: str = "") -> Any:
        """(dotted key, value) of a config mapping, down to the keys the parser knows (or leaves)."""
        for name, value in tree.items() if isinstance(tree, dict) else ():
            key = f"{prefix}{name}"
            if key in self.known_keys or not isinstance(value, dict):
                yield key, value
            else:
                yield from self.config_entries(value, f"{key}.")

    def owner_of(self, key: str) -> str | None:
        """The longest known key that ``key`` extends (``model.net`` for ``model.net.depth``), or None."""
        parts = key.split(".")
        owners = (".".join(parts[:n]) for n in range(len(parts) - 1, 0, -1))
        return next((owner for owner in owners if owner in self.known_keys), None)

    def class_at(self, owner: str, rest: list[str]) -> tuple[type | None, str]:
        """The class configured at ``owner`` (its ``class_path`` as given, parsed without the unknown key), else the
        class its type hint names."""
        config = self.parses(rest)
        value = config.get(f"{self.sub}.{owner}") if hasattr(config, "get") else None
        if hasattr(value, "get") and value.get("class_path"):
            return import_class(value["class_path"]), value["class_path"]
        cls = self.hinted_class(owner)
        return cls, f"{cls.__module__}.{cls.__qualname__}" if cls is not None else owner

    def hinted_class(self, key: str) -> type | None:
        top, *names = key.split(".")
        cls = self.classes.get(top)
        for name in names:
            cls = class_of(type_hint(cls, name)) if cls is not None else None
        return cls

    def refused_value(self, key: str, value: str | None, rest: list[str]) -> str:
        """``key``'s value was refused (the arguments parse without it): say what its type hint accepts."""
        if value and (key == "data" or key.endswith(".class_path")) and import_class(value) is None:
            return f"{key}={value}: cannot import {value} (give a class path, e.g. datamodules.WebDataModule)"
        owner, _, name = key.rpartition(".")
        cls = self.class_at(owner.removesuffix(".init_args"), rest)[0] if owner else None
        hint = type_hint(cls, name) if cls is not None else None
        choices = literal_choices(hint)
        if choices is not None:
            return f"{key}={value} is not accepted; expected one of {choices}"
        return f"{key}: Expected a {hint}. Got value: {value}" if hint is not None else f"{key}={value} is not accepted"


def takes_any_keyword(cls: Any) -> bool:
    """Whether ``cls``'s constructor has ``**kwargs`` (its accepted keys are then not all in its signature)."""
    try:
        return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls).parameters.values())
    except (ValueError, TypeError):
        return True


def literal_choices(hint: Any) -> str | None:
    """``'a', 'b', null`` for a hint made only of Literals (and None), else None."""
    if hint is None:
        return None
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    values: list[str] = []
    for member in members:
        if member is type(None):
            values.append("null")
        elif typing.get_origin(member) is typing.Literal:
            values += [repr(v) for v in typing.get_args(member)]
        else:
            return None
    return ", ".join(values)
