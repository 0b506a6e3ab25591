"""Every recipe is also a notebook (``# %%`` cells): the cells parse, and one lesson runs cell by cell in a Jupyter kernel.

Lesson 12 is the one executed, on a tiny grid: it has the most cells, a plot that must appear under
its cell, and flags that reach the recipe through ``$HF_MODELS_RECIPE_ARGS`` rather than ``sys.argv``.
"""

from __future__ import annotations

import ast
import json
import shlex
from pathlib import Path

import pytest

from hf_models.data import load_corpus
from hf_models.recipe_support.notebook import execute_recipe_notebook, recipe_notebook
from tests.test_ablations import TINY_GRID

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("[0-9][0-9]_*.py"))


def test_there_are_twelve_lessons():
    assert [p.name[:2] for p in RECIPES] == [f"{n:02d}" for n in range(1, 13)]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_opens_as_a_notebook_of_lesson_text_and_code(recipe):
    notebook = recipe_notebook(recipe)
    kinds = [cell.cell_type for cell in notebook.cells]
    assert kinds[0] == "markdown" and notebook.cells[0].source.startswith("# Lesson")  # the lesson's title and text
    assert kinds.count("markdown") >= 2 and kinds.count("code") >= 3  # text between the steps, not one big cell
    for cell in notebook.cells:
        if cell.cell_type == "code":
            ast.parse(cell.source)  # each cell stands alone as Python
    # Nothing hides behind a main(): running the file and running the cells are the same top-level code.
    source = recipe.read_text()
    assert "def main(" not in source and 'if __name__ == "__main__"' not in source
    assert source.count("# %%") == len(notebook.cells)


@pytest.mark.slow
def test_lesson_12_runs_cell_by_cell_in_a_jupyter_kernel(tmp_path, monkeypatch):
    (tmp_path / "grid.yaml").write_text(TINY_GRID)
    (tmp_path / "plays.txt").write_text(load_corpus("shakespeare")["validation"][0]["text"][:30_000])
    flags = ["--grid", str(tmp_path / "grid.yaml"), "--dataset", "text", "--data_files", str(tmp_path / "plays.txt"),
             "--vocab_size", "300", "--output_dir", str(tmp_path / "run")]
    monkeypatch.setenv("HF_MODELS_CACHE", str(tmp_path / "cache"))  # the kernel inherits this process's environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    output = execute_recipe_notebook(REPO / "recipes" / "12_ablations.py", tmp_path / "12_ablations.ipynb",
                                     shlex.join(flags), cwd=tmp_path, timeout=600)
    notebook = json.loads(output.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(cell["execution_count"] for cell in code)  # every cell ran, in order
    outputs = [o for cell in code for o in cell["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    text = "".join("".join(o.get("text", "")) for o in outputs if o["output_type"] == "stream")
    assert "does RoPE help a tiny model?" in text and "| GPT-2 blocks |" in text  # the grid came from the flags
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the curves plot, shown under its cell
    assert (tmp_path / "run" / "results.json").is_file()
