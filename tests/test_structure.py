"""The package's layout as its imports draw it: lower floors never import higher ones, nothing imports
the CLI, no import cycle, and one door into a run folder. Read from the source (every import,
function-level ones too), so a lazy import cannot hide a dependency."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "labeldiff"

# what each floor must not import (docs/explanation/architecture.md, "The layering rules": data, corruption,
# models and the runtime helpers know nothing of pretrain, transfer, evaluate, study or cli; runs.py sits below
# all that open a run)
HIGH = {"runs", "pretrain", "transfer", "evaluate", "sample", "study", "cli", "demo", "bench"}
FORBIDDEN = {  # recipes, examples: the shipped YAML files and their lookup, below everything but errors
    "recipes": HIGH | {"data", "corruption", "models", "config", "runtime", "checkpoint", "fs", "resolve", "settings",
                       "examples"},
    "examples": HIGH | {"data", "corruption", "models", "config", "runtime", "checkpoint", "fs", "resolve", "settings"},
    "errors": HIGH | {"data", "corruption", "models", "config", "runtime", "checkpoint", "fs", "resolve"},
    "fs": HIGH | {"data", "corruption", "models", "config", "runtime", "checkpoint", "resolve"},
    "runtime": HIGH | {"data", "corruption", "models", "config", "resolve"},
    "checkpoint": HIGH | {"data", "corruption", "models", "resolve"},
    "settings": HIGH | {"data", "corruption", "models", "resolve", "config", "checkpoint", "runtime"},
    "config": HIGH | {"data", "corruption", "models", "resolve"},
    "resolve": HIGH,  # above config and the pretext tasks (it derives a method's network), below every command
    "data": HIGH | {"corruption", "models", "resolve"},
    "corruption": HIGH | {"models", "resolve"},
    "models": HIGH | {"resolve"},
    "runs": HIGH - {"runs"},
    "pretrain": {"transfer", "evaluate", "sample", "study", "cli", "demo", "bench"},
    "evaluate": {"pretrain", "transfer", "sample", "study", "cli", "demo", "bench"},
    "sample": {"pretrain", "transfer", "study", "cli", "demo", "bench"},  # may draw with evaluate.report
    "transfer": {"sample", "study", "cli", "demo", "bench"},  # may score with evaluate.metrics
    "study": {"cli"},
}


def modules() -> dict[str, Path]:
    out = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The labeldiff modules ``path`` imports anywhere in it (a name imported from a package is the
    submodule when there is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("labeldiff")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("labeldiff"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or {node.module}
    return found & known


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def floor(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_lower_floors_never_import_higher_ones():
    bad = [f"{m} imports {d}" for m, deps in graph().items() for d in deps
           if "." in m and floor(d) in FORBIDDEN.get(floor(m), set())]
    assert not bad, bad


def test_nothing_imports_the_cli():
    """Only the command line's own modules (its parser, commands, reference generator) import it."""
    assert not [m for m, deps in graph().items()
                if not m.startswith("labeldiff.cli") and any(d.startswith("labeldiff.cli") for d in deps)]


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_one_door_into_a_run_folder():
    """Only runs.py reads a run folder's config.json or weights (the loop reads its own checkpoints)."""
    openers = {m for m, p in modules().items()
               if any(call in p.read_text() for call in ("RunConfig.load(", "load_weights(", "load_file("))}
    assert openers == {"labeldiff.runs", "labeldiff.checkpoint", "labeldiff.models.probe"}, \
        openers
