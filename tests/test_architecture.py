"""The layering of the package, read from its source: no import circle, and a config is data.

Every import counts, those inside functions too (a lazy import that closes a circle is still a
circle: it only hides it until run time); imports under `if TYPE_CHECKING:` do not run and do not count.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gossiplab"


def module_name(path: Path) -> str:
    return ".".join(("gossiplab", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """gossiplab module -> the gossiplab modules it imports (anywhere in its code, at run time)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        type_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for statement in block.body
            for node in ast.walk(statement)
        }
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                targets |= {resolve(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                targets |= {resolve(f"{base}.{alias.name}") or resolve(base) for alias in node.names}
        graph[name] = {target for target in targets if target and target != name}
    return graph


def test_the_package_has_no_import_circle():
    try:
        order = list(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as error:
        raise AssertionError(f"import circle: {' -> '.join(error.args[1])}") from None
    assert "gossiplab.config" in order and "gossiplab.algorithms.dimat" in order  # the graph was read


def test_a_config_imports_no_part_and_no_data():
    """Reading a config (a preset, a run's config.toml) needs only the config's own module, the
    error it raises and the plug-in importer (a config names its plug-ins); the checks that need
    the parts or the data sources live above both, in gossiplab.catalogue."""
    graph = import_graph()
    assert graph["gossiplab.config"] == {"gossiplab.errors", "gossiplab.plugins"}
    assert graph["gossiplab.plugins"] <= {"gossiplab.errors", "gossiplab.registry"}
    assert not graph["gossiplab.errors"]


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_loop_draws_nothing_and_the_parts_know_no_process_runtime():
    """Training (loop, runner, callbacks, evaluation) reaches no plotting code: the plots are a
    callback the API and the command line add; the loop reaches no file of a run directory. Parts
    (operators, mixing rules, algorithms) and the loop talk to the communicator protocol, never to
    torch.distributed's runtime, and the runtime consults no registry of parts (the catalogue
    refuses what it cannot run)."""
    graph = import_graph()
    for module in ("gossiplab.loop", "gossiplab.runner", "gossiplab.callbacks", "gossiplab.evaluation"):
        assert not reachable(graph, module) & {"gossiplab.report", "gossiplab.plots"}, module
    # the loop trains an experiment and a training state and talks to callbacks: it knows no run directory
    run_directory = {"gossiplab.runner", "gossiplab.rundir", "gossiplab.callbacks", "gossiplab.api", "gossiplab.cli"}
    assert not reachable(graph, "gossiplab.loop") & run_directory
    parts = [m for m in graph if m.startswith("gossiplab.algorithms")]
    for module in [*parts, "gossiplab.merge", "gossiplab.mixing", "gossiplab.runner", "gossiplab.evaluation"]:
        assert "gossiplab.distributed" not in reachable(graph, module), module
    assert not graph["gossiplab.distributed"] & {"gossiplab.registry", "gossiplab.catalogue"}


def test_one_module_names_the_files_of_a_run_directory():
    """The run folder (gossiplab.runfolder.RunFolder) owns the names of a run directory's files:
    no other module spells one as a string of its own."""
    names = {"config.toml", "metrics.jsonl", "summary.json", "checkpoint.pt", "premerge.pt", "premerge.json",
             "accuracy_matrices", "tensorboard"}  # fmt: skip
    spelled = {
        module_name(path)
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in names
    }
    assert spelled == {"gossiplab.runfolder"}


def test_following_the_config_from_the_api_never_climbs_back_up(tmp_path):
    """Every call that carries the run's config (or an object holding it: the experiment) during
    `gossiplab.run`, traced: none goes from a module into one that imports it (control climbing
    back up the layers; callbacks are objects of a layer the loop does not import)."""
    import sys

    import gossiplab
    from gossiplab.config import Config

    graph = import_graph()
    importers = {module: {other for other in graph if module in reachable(graph, other)} for module in graph}
    calls = []

    def trace(frame, event, arg):
        module = frame.f_globals.get("__name__", "")
        if event != "call" or not module.startswith("gossiplab"):
            return
        values = frame.f_locals.values()
        if any(isinstance(v, Config) or isinstance(getattr(v, "config", None), Config) for v in values):
            caller = frame.f_back
            while caller is not None and not caller.f_globals.get("__name__", "").startswith("gossiplab"):
                caller = caller.f_back
            calls.append((caller.f_globals["__name__"] if caller else "", module, frame.f_code.co_name))

    sys.setprofile(trace)
    try:
        gossiplab.run("default", ["num_sites=4", "train.steps=20", "eval.every=10"], run_dir=tmp_path / "run")
    finally:
        sys.setprofile(None)
    assert len({module for _, module, _ in calls}) > 10  # the walk was traced
    assert [call for call in calls if call[1] in importers.get(call[0], set())] == []
