"""Registries of named parts: a config names a part, the registry gives it to the assembly.

Built-in parts and a user's parts register the same way, so a user's topology, mixing rule, model
or algorithm is named in TOML exactly like a built-in one (with its module in `plugins = [...]`,
which imports it, and with it its registrations, before the config is checked):

    from gossiplab.registry import MIXING_RULES

    @MIXING_RULES.register("inverse-distance")
    def inverse_distance(adjacency, experiment): ...

A part that was swapped into an experiment from Python without being registered is named by its
qualified name (`my_module.inverse_distance`); the registry resolves such a name when its module
has been imported (named in `plugins`), so `config.toml` re-runs it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownPart(ValueError):
    """A config names a part no registry holds; the message names the field and the choices."""


def qualified_name(part: Any) -> str:
    """module.qualname of a function or class (for an object: of its class)."""
    target = part if hasattr(part, "__qualname__") else type(part)
    return f"{target.__module__}.{target.__qualname__}"


class Registry(Generic[T]):
    """Named parts of one kind, with the config field that names them and per-part properties
    (`distributed`: whether the part runs when the sites are spread over processes)."""

    def __init__(self, kind: str, field: str):
        self.kind, self.field = kind, field
        self._parts: dict[str, T] = {}
        self._properties: dict[str, dict[str, Any]] = {}
        self._origins: dict[str, str] = {}

    def register(self, name: str, part: T | None = None, *, origin: str | None = None, **properties: Any) -> Any:
        """Register `part` under `name` (as a decorator when `part` is omitted). A name is taken
        once; defining the same function again (a notebook cell run twice) replaces it. `origin` is
        the module a saved config must import to find the part again: by default the module that
        registers it (`__main__` for a script or a notebook, which a saved config cannot import)."""
        origin = origin or sys._getframe(1).f_globals.get("__name__", "")

        def add(part: T) -> T:
            known = self._parts.get(name)
            if known is not None and qualified_name(known) != qualified_name(part):  # (a redefinition replaces)
                if qualified_name(known).startswith("gossiplab."):
                    raise ValueError(
                        f"{self.kind} '{name}' is a built-in part of gossiplab ({qualified_name(known)}): a plug-in "
                        f"cannot replace it; register {qualified_name(part)} under another name"
                    )
                raise ValueError(f"{self.kind} '{name}' is registered already (by {qualified_name(known)})")
            self._parts[name] = part
            self._properties[name] = properties
            self._origins[name] = origin
            return part

        return add if part is None else add(part)

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._parts)

    def _resolve(self, name: str) -> T | None:
        if name in self._parts:
            return self._parts[name]
        module, _, attribute = name.rpartition(".")
        target: Any = sys.modules.get(module)  # only modules already imported (plug-ins) are looked in
        for part in attribute.split(".") if target is not None else []:
            target = getattr(target, part, None)
        return target if callable(target) else None

    def get(self, name: str) -> T:
        """The part a config names; an unknown name is refused naming the field and the choices."""
        part = self._resolve(name)
        if part is None:
            raise UnknownPart(
                f"field '{self.field}' = {name!r}: must be one of {', '.join(self.names())} (a registered "
                f"{self.kind}), or a user {self.kind} registered by a module named in `plugins`"
            )
        return part

    def property(self, name: str, key: str, default: Any = None) -> Any:
        """A registered part's property (`distributed`, ...), else the part's attribute of that name."""
        if key in self._properties.get(name, {}):
            return self._properties[name][key]
        return getattr(self._resolve(name), key, default)

    def origin(self, name: str) -> str:
        """The module a config naming this part must import to find it: the module that registered
        it, or the one that defines an unregistered part named by qualified name ('' if unknown)."""
        if name in self._origins:
            return self._origins[name]
        return getattr(self._resolve(name), "__module__", None) or ""

    def name_of(self, part: Any) -> str:
        """The name a config uses for `part`: its registered name, else its qualified name."""
        for name, registered in self._parts.items():
            if registered is part:
                return name
        return qualified_name(part)


TOPOLOGIES: Registry[Callable[..., Any]] = Registry("topology", "gossip.topology")
MIXING_RULES: Registry[Callable[..., Any]] = Registry("mixing rule", "gossip.mixing")
ALGORITHMS: Registry[type] = Registry("algorithm", "gossip.algorithm")
MODELS: Registry[Callable[..., Any]] = Registry("model", "model.name")
LOSSES: Registry[Callable[..., Any]] = Registry("loss", "train.loss")
GRADIENT_TRANSFORMS: Registry[type] = Registry("gradient transform", "train.gradient_transforms")
