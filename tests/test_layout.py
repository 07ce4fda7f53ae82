"""The house's layout (README "Layout"): the import layers hold, no module imports itself back through others,
files and functions stay small, and everything that names a stage agrees with the registry. No Ray: fast."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from character.execution.registry import SPECS, STAGES, run_order, spec_of
from character.core.config import load_config

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "character"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


def _modules() -> dict[str, Path]:
    found = {}
    for path in LIBRARY.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def test_lint_imports_keeps_the_layers_and_the_independent_stages():
    """`lint-imports` with pyproject's contracts (also run by CI before pytest)."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_no_import_cycle_between_modules():
    """grimp's graph (import-linter's) of every import, function-level ones included: no module reaches itself."""
    import grimp

    graph = grimp.build_graph("character")
    cycles = [m for m in sorted(graph.modules)
              if any(graph.find_shortest_chain(importer=other, imported=m)
                     for other in graph.find_modules_directly_imported_by(m))]
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_files_and_functions_stay_small():
    too_long, long_functions = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long and not long_functions, too_long + long_functions


def test_every_registered_stage_has_its_module_and_every_stage_module_is_registered():
    stage_files = {p.stem for p in (LIBRARY / "stages").glob("*.py") if p.stem != "__init__"}
    assert stage_files == {s.name.replace("-", "_") for s in SPECS}
    for spec in SPECS:
        assert spec_of(spec.module) is spec
        assert all(upstream in STAGES and SPECS.index(STAGES[upstream]) < SPECS.index(spec)
                   for upstream in spec.reads(load_config(ROOT / "configs/tiny.yaml")))


def _readme_stage_rows() -> list[tuple[str, str]]:
    rows = re.findall(r"^\| `character ([a-z-]+)[^`]*` \| `([^`]+)` \|", (ROOT / "README.md").read_text(), re.M)
    return [(name, output) for name, output in rows if name not in ("run", "review")]


def test_the_readme_stage_table_follows_the_registry():
    rows = _readme_stage_rows()
    assert [name for name, _ in rows] == [s.name for s in SPECS], "README's stage table: one row per registered " \
        "stage, in the registry's order"
    for name, output in rows:
        assert output.split("/")[0] == STAGES[name].output, f"README: {name} writes {STAGES[name].output}/"


def test_the_cluster_docs_list_the_registered_stages_and_name_no_other():
    text = (ROOT / "docs/cluster.md").read_text()
    listed = re.search(r"The stages, in `run`'s order[^:]*:\s*([a-z\-, \n]+)\.", text).group(1)
    assert [s.strip() for s in listed.replace("\n", " ").split(",")] == [s.name for s in SPECS]
    for doc in ("README.md", "docs/cluster.md"):
        named = re.findall(r"python3? -m rayjobs ([a-z][a-z\-]*)", (ROOT / doc).read_text())
        assert set(named) <= set(STAGES) | {"run"}, f"{doc}: python -m rayjobs names {set(named) - set(STAGES)}"


@pytest.mark.parametrize("method,expected", [
    ("ppo", ["synthesize", "respond", "rank", "train-pm", "train-ppo", "evaluate", "report"]),
    ("dpo", ["synthesize", "respond", "rank", "train-dpo", "evaluate", "report"]),
])
def test_run_order_comes_from_the_registry(method, expected):
    assert run_order(load_config(ROOT / "configs/tiny.yaml", [f"policy.method={method}"])) == expected


@pytest.mark.parametrize("entry", [["-m", "rayjobs", "train-pm"], ["-m", "rayjobs.train_pm"],
                                   ["-m", "rayjobs.pipeline"], ["-m", "rayjobs", "run"]])
def test_rayjobs_entries_reach_the_cli(entry):
    """`python -m rayjobs <stage>` and the per-stage modules kept for existing job specs."""
    proc = subprocess.run([sys.executable, *entry, "--help"], cwd=ROOT, capture_output=True, text=True)
    command = "run" if entry[-1] in ("run", "rayjobs.pipeline") else "train-pm"
    assert proc.returncode == 0 and f"usage: character {command}" in proc.stdout, proc.stderr[-2000:]
