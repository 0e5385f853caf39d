"""User plug-ins: modules a config names (`plugins = ["my_module"]`), imported before the config is
checked, so that the parts they register (topologies, mixing rules, algorithms, models, data
sources) can be named in the same config, and a run of user code re-runs from its own config.toml.
An installed package can offer its module under a plug-in name of its own, an entry point in the
group `gossiplab.plugins` (`my-package = "my_package.gossip"`); the config then names that.

A config is data that may come from someone else; importing a module runs its code. So a plug-in is
an importable module name only (never a file path), a module that would be found inside the folder
of the config being loaded (a run directory, say) is refused, and the run prints which modules it
imports, and from where, before importing them.

A plug-in's fault is the plug-in's: a module that fails on import, a part that raises, and a part
that breaks its contract (checked before step 1 by the assembly) are reported in one line naming
the plug-in module and where it failed, never as a bug in gossiplab; `--debug` (or GOSSIPLAB_DEBUG=1)
shows the plug-in's own traceback.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

from gossiplab.errors import ConfigError

MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
ENTRY_POINTS = "gossiplab.plugins"
IMPORTED: set[str] = set()  # plug-in modules imported through a config's `plugins` or `gossiplab parts`
GOSSIPLAB_DIR = Path(__file__).resolve().parent
DEBUG_HINT = "--debug (or GOSSIPLAB_DEBUG=1) shows its traceback"


class PluginFault(ConfigError):
    """A plug-in's own code failed (on import, or a part it registered raised): the message names
    the module and where; the plug-in's exception is the __cause__."""


DEBUG_OPTION = [False]  # `--debug` of the command being run (set by the command line at every call)


def debugging() -> bool:
    """True when the user asked for plug-ins' tracebacks: `--debug`, or GOSSIPLAB_DEBUG=1."""
    return DEBUG_OPTION[0] or os.environ.get("GOSSIPLAB_DEBUG", "") not in ("", "0")


def plugin_modules() -> set[str]:
    """Modules of user code: the plug-ins imported, and the modules of every part registered from
    outside gossiplab (a module imported by the user's own script registers the same way)."""
    from gossiplab.registry import ALGORITHMS, LOSSES, MIXING_RULES, MODELS, TOPOLOGIES

    modules = set(IMPORTED)
    for registry in (TOPOLOGIES, MIXING_RULES, ALGORITHMS, MODELS, LOSSES):
        for name in registry.names():
            module = getattr(registry.get(name), "__module__", "") or ""
            if not module.startswith("gossiplab"):
                modules.add(module)
    return modules


class UserFrame(NamedTuple):
    module: str
    filename: str
    lineno: int
    name: str


def _user_frame(error: BaseException, modules: set[str]) -> UserFrame | None:
    """The innermost frame of `error`'s traceback that runs code of one of `modules` (or below)."""
    found = None
    for frame, line in traceback.walk_tb(error.__traceback__):
        module = frame.f_globals.get("__name__", "")
        if any(module == m or module.startswith(m + ".") for m in modules):
            found = UserFrame(module, frame.f_code.co_filename, line, frame.f_code.co_name)
    return found


def describe_fault(error: BaseException) -> str:
    """'Type: first line of the message (file:line, in function)', the place being where user code
    (a plug-in, or the user's script) raised `error`, when it did."""
    frame = _user_frame(error, plugin_modules() | {"__main__"})
    where = f" ({frame.filename}:{frame.lineno}, in {frame.name})" if frame else ""
    text = str(error).splitlines()[0][:240] if str(error) else ""
    return f"{type(error).__name__}: {text}{where}"


def plugin_fault(error: BaseException) -> PluginFault | None:
    """A PluginFault naming the plug-in when `error` was raised in a plug-in's code, else None."""
    frame = _user_frame(error, plugin_modules())
    if frame is None:
        return None
    return PluginFault(
        f"plug-in module '{frame.module}' failed: {describe_fault(error)}; a fault of the plug-in, not of gossiplab: "
        f"{DEBUG_HINT}"
    )


def entry_point_modules() -> dict[str, str]:
    """Plug-in name -> module, as installed packages declare them (entry point group gossiplab.plugins)."""
    return {point.name: point.module for point in importlib.metadata.entry_points(group=ENTRY_POINTS)}


def imported_packages(plugins: list[str]) -> list[str]:
    """The modules a config naming `plugins` (module names, or installed packages' entry-point
    names) imports when it is read: gossiplab, and the named plug-ins' modules."""
    packaged = entry_point_modules() if plugins else {}  # scanned once
    return ["gossiplab", *(packaged.get(p, p) for p in plugins)]


def within(module: str, packages: list[str]) -> bool:
    """`module` is one of `packages` or inside one of them."""
    return any(module == package or module.startswith(f"{package}.") for package in packages)


def module_location(name: str) -> Path | None:
    """Where the top-level package or module of `name` would be imported from (nothing is run)."""
    spec = importlib.util.find_spec(name.split(".")[0])
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    return Path(spec.origin).resolve() if spec.origin else None


def import_plugins(names: list[str], untrusted: list[Path]) -> None:
    """Import the plug-in modules `names`, refusing any that is not a module name or that lives
    under one of the `untrusted` folders; announces each on standard error before importing it."""
    errors, found = [], {}
    packaged = entry_point_modules()
    for requested in names:
        name = packaged.get(requested, requested)  # an installed package's plug-in name -> its module
        if not MODULE_NAME.fullmatch(name):
            errors.append(f"'{name}' is not a module name (a plug-in is named as for import, never by a file path)")
            continue
        if name in sys.modules:
            continue
        location = module_location(name)
        if location is None:
            errors.append(f"module '{name}' is not importable: install it, or put its folder on PYTHONPATH")
        elif any(location.is_relative_to(folder.resolve()) for folder in untrusted):
            errors.append(
                f"module '{name}' would be imported from {location}, inside the folder of the config being "
                "loaded: code shipped beside a config is never run; install it or put it on PYTHONPATH elsewhere"
            )
        else:
            found[name] = location
    if errors:
        raise ConfigError("\n".join(f"field 'plugins': {e}" for e in errors))
    for name, location in found.items():
        print(f"importing plug-in {name} from {location}", file=sys.stderr, flush=True)
        IMPORTED.add(name)
        try:
            importlib.import_module(name)
        except Exception as error:
            raise PluginFault(
                f"field 'plugins': plug-in module '{name}' ({location}) failed while being imported: "
                f"{describe_fault(error)}; {DEBUG_HINT}"
            ) from error
