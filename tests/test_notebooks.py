"""The notebooks in notebooks/ are stored for review: valid nbformat v4, no outputs, and they honour quick mode.

Running them is nbmake's job: ``pytest`` collects notebooks/ with ``--nbmake`` (pyproject.toml) and runs each one in
quick mode (notebooks/conftest.py). These checks read the files only, so they cost nothing and fail a notebook
committed with its outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
QUICK_VARIABLE = "FLAX_RESNET_QUICK"


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def test_the_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} >= {"resnets_and_skip_connections.ipynb", "resnets.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_valid_nbformat_v4(path: Path):
    import nbformat  # nbmake's own dependency, so installed with the [test] extra
    notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    assert notebook.nbformat == 4, f"{path.name} is nbformat {notebook.nbformat}, expected 4"
    nbformat.validate(notebook)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_stripped(path: Path):
    """No outputs, no execution counts, minimal metadata: strip a notebook before committing it (for instance
    ``jupyter nbconvert --clear-output --inplace``, then remove the extra metadata, or nbstripout)."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    problems = []
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            if cell.get("outputs"):
                problems.append(f"cell {index} has {len(cell['outputs'])} outputs")
            if cell.get("execution_count") is not None:
                problems.append(f"cell {index} has execution_count {cell['execution_count']}")
        extra = set(cell.get("metadata", {})) - {"tags"}
        if extra:
            problems.append(f"cell {index} has metadata {sorted(extra)}")
    extra = set(notebook.get("metadata", {})) - {"kernelspec", "language_info"}
    if extra:
        problems.append(f"notebook metadata has {sorted(extra)}")
    kernel = notebook.get("metadata", {}).get("kernelspec", {}).get("name")
    if kernel != "python3":
        problems.append(f"kernelspec name is {kernel!r}, expected 'python3'")
    assert not problems, f"{path.name} is not stored stripped:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_reads_the_quick_mode_variable(path: Path):
    """CI runs every notebook with FLAX_RESNET_QUICK=1; a notebook that ignores it would train for hours."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    code = [_source(cell) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert any(QUICK_VARIABLE in source for source in code), f"{path.name} never reads {QUICK_VARIABLE}"
    markdown = [_source(cell) for cell in notebook["cells"] if cell["cell_type"] == "markdown"]
    assert any("Quick mode" in source for source in markdown), f"{path.name} does not say what quick mode changes"
