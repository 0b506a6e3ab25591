"""Each lesson's model is whole in its own modeling file; the blocks lessons share are copies kept identical by a check.

``utils/check_copies.py`` recomputes every block marked ``# Copied from hf_models.<module>.<name> [with A->B]``
from its original. The suite runs it on the package (so a drifted copy fails CI), and shows on a
scratch copy of the package that it catches a drifted copy, that ``--fix`` restores it byte for
byte, and that a change to an original reaches every copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "utils"))
import check_copies  # noqa: E402

PACKAGE = ROOT / "hf_models"


@pytest.fixture
def scratch(tmp_path) -> Path:
    """The flat model modules of the package, copied to a scratch folder the test may break."""
    for path in PACKAGE.glob("*.py"):
        shutil.copyfile(path, tmp_path / path.name)
    return tmp_path


def test_every_copy_in_the_package_is_identical_to_its_original():
    problems = check_copies.check(PACKAGE)
    assert problems == [], "\n".join(problems)
    copies, errors = check_copies.find_copies(PACKAGE)
    assert not errors
    by_file = {copy.path.name for copy in copies}
    # The later lessons share lesson 4's and 5's blocks by copying, never by importing each other.
    assert {"modeling_modern.py", "modeling_moe.py", "modeling_configurable.py"} <= by_file


def test_the_lesson_files_do_not_import_each_other():
    for path in PACKAGE.glob("modeling_*.py"):
        text = path.read_text(encoding="utf-8")
        assert "from .modeling_" not in text, f"{path.name} imports another lesson's modeling file"


def test_a_drifted_copy_fails_and_fix_restores_it_byte_for_byte(scratch):
    target = scratch / "modeling_modern.py"
    original = target.read_text(encoding="utf-8")
    line = "        logits = self.lm_head(keep_last_positions(outputs.last_hidden_state, logits_to_keep))"
    assert original.count(line) == 1  # inside ModernDecoderForCausalLM, copied from GPTForCausalLM
    target.write_text(original.replace(line, line.replace("logits_to_keep))", "logits_to_keep)) * 1.0")), encoding="utf-8")

    problems = check_copies.check(scratch)
    assert len(problems) == 1 and problems[0].startswith("modeling_modern.py:") and "drifted" in problems[0]
    assert "* 1.0" in problems[0]  # the diff shows the drift
    cli = subprocess.run([sys.executable, str(ROOT / "utils" / "check_copies.py"), f"--root={scratch}"], capture_output=True, text=True)
    assert cli.returncode == 1 and "make fix-copies" in cli.stderr

    assert check_copies.check(scratch, fix=True) == []
    assert target.read_text(encoding="utf-8") == original


def test_a_change_to_an_original_reaches_every_copy_with_fix(scratch):
    source = scratch / "modeling_gpt.py"
    text = source.read_text(encoding="utf-8")
    old = '"""(T, S) boolean causal mask for the last T of S positions: query i sees keys <= S - T + i."""'
    new = '"""(T, S) boolean causal mask, bottom-right aligned: query i sees keys <= S - T + i."""'
    source.write_text(text.replace(old, new), encoding="utf-8")
    drifted = {problem.split(":")[0] for problem in check_copies.check(scratch)}
    # lesson 10 copies lesson 5's copy, so it drifts once lesson 5's is fixed; --fix settles the chain.
    assert {"modeling_modern.py", "modeling_configurable.py"} <= drifted
    assert check_copies.check(scratch, fix=True) == []
    for name in ("modeling_modern.py", "modeling_moe.py", "modeling_configurable.py"):
        assert new in (scratch / name).read_text(encoding="utf-8")


def test_renames_apply_and_a_marker_naming_nothing_is_an_error(scratch):
    modern = (scratch / "modeling_modern.py").read_text(encoding="utf-8")
    # "with GPT->ModernDecoder": the copy of GPTForCausalLM builds a ModernDecoderModel.
    assert "base_model_class = ModernDecoderModel" in modern and "GPTModel" not in modern
    broken = modern.replace("# Copied from hf_models.modeling_gpt.GPTForCausalLM with", "# Copied from hf_models.modeling_gpt.NoSuchClass with")
    (scratch / "modeling_modern.py").write_text(broken, encoding="utf-8")
    problems = check_copies.check(scratch)
    assert any("hf_models.modeling_gpt has no NoSuchClass" in problem for problem in problems)


def test_no_model_inherits_from_another_lessons_model():
    """As transformers' ``LlamaForCausalLM -> LlamaPreTrainedModel -> PreTrainedModel``: at most two zoo classes
    between ``PreTrainedModel`` and a causal LM, and none of them from another lesson's file."""
    import hf_models
    from transformers import PreTrainedModel

    for model_type, (_, model_class) in hf_models.MODEL_REGISTRY.items():
        for cls in (model_class, model_class.base_model_class):
            if cls is None:
                continue
            mro = cls.__mro__[: cls.__mro__.index(PreTrainedModel)]
            zoo = [c for c in mro if c.__module__.startswith("hf_models")]
            assert len(zoo) <= 3, f"{model_type}: {[c.__name__ for c in zoo]}"  # the class itself + two
            modules = {c.__module__ for c in zoo} - {cls.__module__, "hf_models.causal_lm"}
            assert not modules, f"{cls.__name__} inherits from {modules}"
