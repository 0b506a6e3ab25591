"""The code a saved model folder carries runs wherever transformers does, and does nothing on import.

``save_pretrained`` copies a model's configuration and modeling files into the folder together with
every same-folder module they import relatively, so any flat module of ``hf_models/`` may travel
(``__init__.py`` never does: it is the installed package's registry). Each one, found by listing the
folder rather than by a hand-kept list, must import only the standard library, torch, transformers
and sibling files that exist, spelt so that transformers' own scan (``get_relative_imports``) finds
them, and importing it must open no file, socket or process: the reference for "no I/O" is Python's
audit hooks (``sys.addaudithook``), in a fresh interpreter that imports the modules as transformers
does, as a package of copied files.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import textwrap
from graphlib import TopologicalSorter
from pathlib import Path

import pytest
from transformers.dynamic_module_utils import get_relative_imports

PACKAGE = Path(__file__).resolve().parents[1] / "hf_models"
CARRIED = sorted(path.stem for path in PACKAGE.glob("*.py") if path.name != "__init__.py")
ALLOWED_TOP_LEVEL = {"torch", "transformers"} | set(sys.stdlib_module_names)


def imports(name: str) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in the module, at any depth (a lazy import inside a function travels too)."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def sibling_imports(name: str) -> set[str]:
    return {node.module for node in imports(name) if isinstance(node, ast.ImportFrom) and node.level}


def test_the_flat_modules_are_found():
    assert {"kv_cache", "causal_lm", "int8", "quantization_int8"} <= set(CARRIED)
    assert any(name.startswith("modeling_") for name in CARRIED) and any(name.startswith("configuration_") for name in CARRIED)


@pytest.mark.parametrize("name", CARRIED)
def test_imports_only_stdlib_torch_transformers_and_siblings(name):
    for node in imports(name):
        statement = f"{name}.py: {ast.unparse(node)}"
        if isinstance(node, ast.ImportFrom) and node.level:
            # trust_remote_code copies only same-folder relative imports: one dot, one existing file.
            assert node.level == 1 and node.module and "." not in node.module, statement
            assert (PACKAGE / f"{node.module}.py").is_file(), f"{statement}: no sibling {node.module}.py"
            continue
        roots = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
        bad = {root.split(".")[0] for root in roots} - ALLOWED_TOP_LEVEL
        assert not bad, f"{statement}: {sorted(bad)} is not the standard library, torch or transformers"


@pytest.mark.parametrize("name", CARRIED)
def test_transformers_finds_every_sibling_import(name):
    """A relative import that transformers' scan misses would not be copied into the saved folder."""
    assert set(get_relative_imports(PACKAGE / f"{name}.py")) == sibling_imports(name)


# The child interpreter: pre-import what the modules import from outside (their own import-time
# work is not the carried code's), then import each carried module, dependencies first, under an
# audit hook. Reading code is the import system's work; any other file, directory listing, socket
# or process is reported against the module being imported.
AUDIT_SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.util, json, os, sys
    sys.dont_write_bytecode = True
    root, order, outside_imports = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    for statement in outside_imports:
        try:
            exec(statement, {})
        except Exception:
            pass  # the module's own import then fails and says why
    sys.path.insert(0, root)
    import carried
    importlib.util.find_spec("carried._warm_the_finder")  # list the folder now, not under the hook

    IO_EVENTS = (
        "open", "os.listdir", "os.scandir", "glob.", "os.mkdir", "os.remove", "os.rename", "os.rmdir",
        "os.truncate", "os.chmod", "os.chown", "os.link", "os.symlink", "os.utime", "os.chdir",
        "shutil.", "tempfile.", "socket.", "urllib.", "http.", "ftplib.", "smtplib.", "webbrowser.",
        "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.kill", "pty.",
    )
    current, events = None, {}

    def hook(event, args):
        if current is None or not event.startswith(IO_EVENTS):
            return
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and os.fsdecode(args[0]).endswith((".py", ".pyc")):
            return
        events[current].append(f"{event} {args!r:.200}")

    sys.addaudithook(hook)
    for name in order:
        events[name] = []
        current = name
        importlib.import_module(f"carried.{name}")
    current = None
    print(json.dumps(events))
    """
)


@pytest.fixture(scope="module")
def import_time_io(tmp_path_factory) -> dict[str, list[str]]:
    """{module: the I/O events seen while importing it}, from one child interpreter for all modules."""
    root = tmp_path_factory.mktemp("carried_code")
    folder = root / "carried"
    folder.mkdir()
    for name in CARRIED:
        shutil.copyfile(PACKAGE / f"{name}.py", folder / f"{name}.py")
    (folder / "__init__.py").write_text("")
    order = list(TopologicalSorter({name: sibling_imports(name) for name in CARRIED}).static_order())
    outside = sorted({ast.unparse(node) for name in CARRIED for node in imports(name) if not getattr(node, "level", 0)})
    result = subprocess.run(
        [sys.executable, "-c", AUDIT_SCRIPT, str(root), json.dumps(order), json.dumps(outside)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(root), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", CARRIED)
def test_import_does_no_file_network_or_process_io(name, import_time_io):
    assert import_time_io[name] == [], f"importing {name}.py: {import_time_io[name]}"
