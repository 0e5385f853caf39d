"""User plug-ins: modules a config names (`plugins = ["my_module"]`), imported before the config is
checked, so that the parts they register (topologies, mixing rules, algorithms, models, data
sources) can be named in the same config, and a run of user code re-runs from its own config.toml.
An installed package can offer its module under a plug-in name of its own, an entry point in the
group `gossiplab.plugins` (`my-package = "my_package.gossip"`); the config then names that.

A config is data that may come from someone else; importing a module runs its code. So a plug-in is
an importable module name only (never a file path), a module that would be found inside the folder
of the config being loaded (a run directory, say) is refused, and the run prints which modules it
imports, and from where, before importing them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path

from gossiplab.config import ConfigError

MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
ENTRY_POINTS = "gossiplab.plugins"


def entry_point_modules() -> dict[str, str]:
    """Plug-in name -> module, as installed packages declare them (entry point group gossiplab.plugins)."""
    return {point.name: point.module for point in importlib.metadata.entry_points(group=ENTRY_POINTS)}


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
        importlib.import_module(name)
