"""Controlled experiments on the zoo's models (lesson 12): ablation grids, run resumably over seeds, and the zoo's leaderboard.

* ``grid.py``: the grid file a person edits (YAML or JSON), checked before anything trains;
* ``ablation.py``: one cell = one (config, seed) run on lesson 7's loop, resumable and bitwise
  reproducible; the summary over seeds (mean, std, difference against the seed noise), the
  CSV/Markdown tables and the curves plot;
* ``leaderboard.py``: every lesson's ``results.json`` -> the README's lesson table and plot, and
  the docs/lessons pages' result and scaling blocks;
* ``scaling.py``: a lesson's model beside the frontier model it grows into (parameters, FLOPs per
  token, KV-cache bytes), computed from the two configs.
"""

from .ablation import CellData, cell_folder, plot_curves, run_cell, summarise, write_tables
from .grid import Grid, load_grid, slug

__all__ = ["CellData", "Grid", "cell_folder", "load_grid", "plot_curves", "run_cell", "slug", "summarise", "write_tables"]
