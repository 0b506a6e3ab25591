"""Keep the blocks that lessons copy from each other identical: the zoo's ``utils/check_copies.py``.

Each lesson's model is whole in its own ``hf_models/modeling_<name>.py`` (transformers'
single-model-file policy), so a block two lessons share is written out in both. The later lesson's
copy carries a marker on the line above it::

    # Copied from hf_models.modeling_gpt.GPTForCausalLM with GPT->ModernDecoder
    class ModernDecoderForCausalLM(ModernDecoderPreTrainedModel, GenerationMixin):

The marker names the original (a top-level class, function or assignment, or ``Class.method``) and,
after ``with``, renames applied to it in order (``A->B``, comma separated). This script recomputes
each marked block from its original and fails, with a diff, where the two have drifted; ``--fix``
(``make fix-copies``) rewrites the copies from their originals instead. The test suite runs it, so
a change to one lesson's block that is not carried to its copies fails CI.

    python utils/check_copies.py          # check; exit 1 and a diff per drifted copy
    python utils/check_copies.py --fix    # rewrite every copy from its original
"""

from __future__ import annotations

import ast
import difflib
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

MARKER = re.compile(r"^(?P<indent>\s*)# Copied from hf_models\.(?P<module>\w+)\.(?P<name>[\w.]+)(?: with (?P<renames>.+))?\s*$")
DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "hf_models"


@dataclass
class Copy:
    """One marked block: where it is (lines ``start``..``end``, 1-based, inclusive) and what it should be."""

    path: Path
    marker_line: int
    start: int
    end: int
    source: str
    expected: str


def _definitions(tree: ast.Module) -> dict[str, ast.AST]:
    """``{name: node}`` for top-level classes, functions and single-name assignments, and ``Class.method``."""
    found: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node
            if isinstance(node, ast.ClassDef):
                for member in node.body:
                    if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        found[f"{node.name}.{member.name}"] = member
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found[node.target.id] = node
    return found


def _first_line(node: ast.AST) -> int:
    decorators = getattr(node, "decorator_list", [])
    return min([node.lineno] + [d.lineno for d in decorators])


def _block(lines: list[str], node: ast.AST) -> str:
    return "".join(lines[_first_line(node) - 1 : node.end_lineno])


def _rename(text: str, renames: str | None) -> str:
    for pair in (renames or "").split(","):
        if pair.strip():
            old, _, new = pair.strip().partition("->")
            if not new:
                raise ValueError(f"a rename must read OLD->NEW, got {pair.strip()!r}")
            text = text.replace(old.strip(), new.strip())
    return text


def find_copies(root: Path) -> tuple[list[Copy], list[str]]:
    """Every marked block under ``root`` (flat ``*.py``), and the errors of markers that cannot be resolved."""
    copies, errors = [], []
    parsed: dict[str, tuple[list[str], dict[str, ast.AST]]] = {}

    def module(name: str) -> tuple[list[str], dict[str, ast.AST]] | None:
        if name not in parsed:
            path = root / f"{name}.py"
            if not path.is_file():
                return None
            text = path.read_text(encoding="utf-8")
            parsed[name] = (text.splitlines(keepends=True), _definitions(ast.parse(text)))
        return parsed[name]

    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        starts = {_first_line(node): node for node in ast.walk(ast.parse(text)) if isinstance(node, (ast.stmt,))}
        for number, line in enumerate(lines, start=1):
            match = MARKER.match(line)
            if not match:
                continue
            where = f"{path.name}:{number}"
            target = starts.get(number + 1)
            if target is None:
                errors.append(f"{where}: the line after a '# Copied from' marker must start the copied definition")
                continue
            original = module(match["module"])
            if original is None:
                errors.append(f"{where}: no module hf_models/{match['module']}.py")
                continue
            original_lines, definitions = original
            if match["name"] not in definitions:
                errors.append(f"{where}: hf_models.{match['module']} has no {match['name']}")
                continue
            try:
                source = _rename(_block(original_lines, definitions[match["name"]]), match["renames"])
            except ValueError as error:
                errors.append(f"{where}: {error}")
                continue
            expected = textwrap.indent(textwrap.dedent(source), match["indent"], lambda s: s.strip() != "")
            copies.append(Copy(path, number, _first_line(target), target.end_lineno, "".join(lines[_first_line(target) - 1 : target.end_lineno]), expected))
    return copies, errors


def check(root: Path = DEFAULT_ROOT, fix: bool = False) -> list[str]:
    """The problems found (empty when every copy matches). With ``fix``, drifted copies are rewritten
    (repeatedly, so a copy of a copy settles too) and only unresolvable markers are reported."""
    for _ in range(5):
        copies, errors = find_copies(root)
        drifted = [copy for copy in copies if copy.source != copy.expected]
        if not fix or not drifted or errors:
            break
        for path in {copy.path for copy in drifted}:
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            for copy in sorted((c for c in drifted if c.path == path), key=lambda c: c.start, reverse=True):
                lines[copy.start - 1 : copy.end] = [copy.expected]
            path.write_text("".join(lines), encoding="utf-8")
    problems = list(errors)
    for copy in drifted:
        diff = "".join(
            difflib.unified_diff(
                copy.expected.splitlines(keepends=True), copy.source.splitlines(keepends=True),
                "expected (from the original)", f"{copy.path.name}:{copy.start}", n=1,
            )
        )
        problems.append(f"{copy.path.name}:{copy.marker_line}: the copy has drifted from its original; run `make fix-copies`.\n{diff}")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: check_copies.py [--fix] [--root=FOLDER]  (FOLDER defaults to hf_models/)"
    if "-h" in argv or "--help" in argv:
        print(__doc__.split("\n\n")[0] + "\n\n" + usage)
        return 0
    unknown = [a for a in argv if a != "--fix" and not a.startswith("--root=")]
    if unknown:
        print(f"check_copies.py: unknown argument(s) {unknown}; {usage}", file=sys.stderr)
        return 2
    root = next((Path(a.split("=", 1)[1]) for a in argv if a.startswith("--root=")), DEFAULT_ROOT)
    if not root.is_dir():
        print(f"check_copies.py: --root={root} is not a folder", file=sys.stderr)
        return 2
    problems = check(root, fix="--fix" in argv)
    for problem in problems:
        print(problem, file=sys.stderr)
    copies, _ = find_copies(root)
    if not problems:
        print(f"check_copies: {len(copies)} copies, all identical to their originals")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
