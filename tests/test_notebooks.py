"""The notebooks in notebooks/ are stored for review: valid nbformat v4, no outputs, and they honour quick mode.

Running them is nbmake's job: ``pytest`` collects notebooks/ with ``--nbmake`` (pyproject.toml) and runs each one in
quick mode (notebooks/conftest.py). These checks read the files only, so they cost nothing and fail a notebook
committed with its outputs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
QUICK_VARIABLE = "FLAX_RESNET_QUICK"


def _markdown(path: Path) -> str:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    return "\n".join(_source(cell) for cell in notebook["cells"] if cell["cell_type"] == "markdown")


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


IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)|<img\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)", re.IGNORECASE)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_images_show_offline(path: Path):
    """An image the markdown fetches from a web site shows nothing offline (and breaks when the site moves): ship
    it in the repository, or draw it in a cell. Links to papers are fine; only images are checked."""
    problems = []
    for match in IMAGE.finditer(_markdown(path)):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:|//", target, re.IGNORECASE):
            problems.append(f"{target} is not a file of the repository")
        elif not (path.parent / target.split("#")[0]).is_file():
            problems.append(f"{target} does not exist (relative to {path.parent.name}/)")
    assert not problems, f"{path.name}: " + "; ".join(problems)


def test_notebook_000_states_the_counts_its_models_have():
    """Every conv-layer and parameter count notebook 000's text states is one its models have, at the n_blocks it
    uses (1 in quick mode, 3 in its tests, 5 in its training runs). The ResNet has two 1x1 projection shortcuts
    more than the plain CNN, hence 2,752 parameters more at every n_blocks: the text must not call the counts
    equal."""
    import torch.nn as nn

    from torch_ref import PlainDeepCNN, SimpleResNet

    def params(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    def convs(model: nn.Module) -> int:  # the main path's 3x3 convs: what "N conv layers" counts
        return sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())

    models = {n: (PlainDeepCNN(n_blocks=n), SimpleResNet(n_blocks=n)) for n in (1, 3, 5)}
    conv_counts = {convs(model) for pair in models.values() for model in pair}
    counts = {params(model) for pair in models.values() for model in pair}
    counts |= {params(resnet) - params(plain) for plain, resnet in models.values()}
    counts |= {60_000, 50_000, 10_000}  # CIFAR-10's images: all, training, test
    text = _markdown(NOTEBOOK_DIR / "resnets_and_skip_connections.ipynb")

    stated_convs = [int(n) for n in re.findall(r"(\d+) conv layers", text)]
    assert stated_convs, "the text no longer states a conv layer count: update this test"
    wrong = sorted(set(stated_convs) - conv_counts)
    assert not wrong, f"the text states {wrong} conv layers; the models have {sorted(conv_counts)}"
    stated = {int(n.replace(",", "")) for n in re.findall(r"\b\d{1,3}(?:,\d{3})+\b", text)}
    wrong = sorted(stated - counts)
    assert not wrong, f"the text states {wrong}, which is no parameter count of its models ({sorted(counts)})"
    for percent, n in re.findall(r"(\d+(?:\.\d+)?)% at `n_blocks=(\d)`", text):
        plain, resnet = models[int(n)]
        assert float(percent) == round(100 * (params(resnet) - params(plain)) / params(plain), 1), (percent, n)
    assert not re.search(r"same number of\s+parameters", text), "the ResNet has more parameters than the plain CNN"
