"""The recipes are scripts and notebooks at once (``# %%`` cells); this is the little that differs between the two.

A script saves its plots to files and prints where; a notebook should also show them under the
cell. :func:`show` does both: it always leaves the file, and in a Jupyter kernel it displays it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .arguments import NOTEBOOK_ARGS_VARIABLE, in_notebook


def show(path: str | os.PathLike) -> Path:
    """Display the image at ``path`` when running as a notebook; return the path either way."""
    path = Path(path)
    if in_notebook() and path.exists():
        from IPython.display import Image, display

        display(Image(filename=str(path)))
    return path


# ----------------------------------------------------------------------------- recipe -> executed notebook


def recipe_notebook(recipe: str | os.PathLike):
    """The recipe's ``# %%`` cells as an ``nbformat`` notebook (jupytext's percent format), not executed."""
    import jupytext

    notebook = jupytext.read(str(recipe), fmt="py:percent")
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


def execute_recipe_notebook(
    recipe: str | os.PathLike, output: str | os.PathLike, recipe_args: str = "", cwd: str | os.PathLike = ".", timeout: int = 3600
) -> Path:
    """Run ``recipe`` as a notebook, cell by cell in a Jupyter kernel, and save it with its outputs and plots to ``output``.

    ``recipe_args`` are the recipe's flags (``$HF_MODELS_RECIPE_ARGS`` in the kernel, see
    ``arguments.recipe_argv``); the kernel starts in ``cwd``, so the recipe's default ``runs/`` paths
    land where the script's would. A failing cell raises ``nbclient``'s ``CellExecutionError`` naming
    it; the notebook is saved either way, so the error can be read in context.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = recipe_notebook(recipe)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get(NOTEBOOK_ARGS_VARIABLE)
    os.environ[NOTEBOOK_ARGS_VARIABLE] = recipe_args  # the kernel inherits this process's environment
    try:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    finally:
        if previous is None:
            os.environ.pop(NOTEBOOK_ARGS_VARIABLE, None)
        else:
            os.environ[NOTEBOOK_ARGS_VARIABLE] = previous
        nbformat.write(notebook, str(output))
    return output


@dataclass
class NotebookArguments:
    """``python -m hf_models.recipe_support.notebook --recipes recipes/NN_name.py ...``: each recipe -> OUTPUT_DIR/NN_name.ipynb."""

    recipes: list[str] = field(metadata={"help": "Recipes to execute as notebooks (recipes/NN_name.py)."})
    output_dir: str = field(default="notebooks", metadata={"help": "Where the executed notebooks go."})
    recipe_args: str = field(default="", metadata={"help": "Flags passed to every recipe, as one string (e.g. '--max_steps 20')."})
    timeout: int = field(default=3600, metadata={"help": "Seconds per cell."})


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(NotebookArguments, description="Execute recipes as notebooks, with their outputs and plots.")
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    for recipe in args.recipes:
        output = Path(args.output_dir) / (Path(recipe).stem + ".ipynb")
        print(f"{recipe} -> {output}", flush=True)
        execute_recipe_notebook(recipe, output, args.recipe_args, timeout=args.timeout)


__all__ = ["NotebookArguments", "execute_recipe_notebook", "recipe_notebook", "show"]


if __name__ == "__main__":
    main()
