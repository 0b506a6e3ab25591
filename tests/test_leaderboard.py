"""The leaderboard writes the README's lesson table from the runs' results.json files, and nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_models.experiments import leaderboard

REPO = Path(__file__).resolve().parents[1]


def metrics(bpb: float) -> dict:
    return {"loss": bpb * 1.5, "perplexity": 2.0 ** bpb, "bits_per_byte": bpb, "tokens": 100, "bytes": 300}


def write(runs: Path, run: str, payload: dict) -> None:
    (runs / run).mkdir(parents=True, exist_ok=True)
    (runs / run / "results.json").write_text(json.dumps(payload))


def test_the_table_holds_each_runs_numbers_and_dashes_where_there_is_no_run(tmp_path):
    runs = tmp_path / "runs"
    write(runs, "04_gpt", {"validation": metrics(2.17), "test": metrics(2.2412), "parameters": 2188992, "train_tokens_per_second": 12293.4})
    write(runs, "09_quantization", {"split": "test", "results": {"hand int8 weight-only": {"held_out": metrics(2.1381)}}})
    write(runs, "12_ablations", {"validation": metrics(1.9876), "parameters": 800000, "train_tokens_per_second": 20000})
    # Lesson 8 times both paths; its row takes the hand-written one, and the saved folder's parameter count.
    write(runs, "08_lora_sft", {"test": metrics(2.3), "tokens_per_second": {"hand loop + hand LoRA": 3774.9, "hand_over_trl": 1.5, "trl + peft": 2452.2},
                                "model_folder": str(runs / "08_lora_sft" / "model")})
    (runs / "08_lora_sft" / "model").mkdir()
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(runs / "08_lora_sft" / "model" / "model.safetensors"))
    readme = tmp_path / "README.md"
    readme.write_text(f"# zoo\n\nbefore\n{leaderboard.START}\nold table\n{leaderboard.END}\nafter\n")
    assert leaderboard.main(["--runs", str(runs), "--readme", str(readme), "--plot", str(tmp_path / "lb.png")]) == 0

    text = readme.read_text()
    assert text.startswith("# zoo\n\nbefore\n") and text.endswith("after\n") and "old table" not in text
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| ")}
    assert rows["4"][4:10] == ["2,188,992", "12,293", "2.1700", "2.2412", f"{2.2412 * 1.5:.4f}", f"{2 ** 2.2412:.2f}"]
    assert rows["9"][7] == "2.1381" and rows["9"][4] == "—"
    assert rows["8"][4:6] == ["17", "3,775"]
    assert rows["12"][6:8] == ["1.9876", "—"]  # validation only
    assert rows["1"][4:] == ["—"] * 6  # no run yet: the row stays, with dashes
    assert len([r for r in rows if r.isdigit()]) == 12
    assert (tmp_path / "lb.png").stat().st_size > 1000
    # --check: the README now is what the runs give; change a run and it is not.
    assert leaderboard.main(["--runs", str(runs), "--readme", str(readme), "--check"]) == 0
    write(runs, "04_gpt", {"validation": metrics(2.17), "test": metrics(2.2), "parameters": 1, "train_tokens_per_second": 1})
    assert leaderboard.main(["--runs", str(runs), "--readme", str(readme), "--check"]) == 1


def test_a_readme_without_one_pair_of_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match=r"must hold exactly one <!-- leaderboard:start --> \.\.\. <!-- leaderboard:end --> pair"):
        leaderboard.main(["--runs", str(tmp_path), "--readme", str(readme), "--plot", str(tmp_path / "lb.png")])
    assert readme.read_text() == "no markers\n"


def test_the_repositorys_readme_has_the_markers_and_every_lesson():
    text = (REPO / "README.md").read_text()
    assert text.count(leaderboard.START) == 1 and text.count(leaderboard.END) == 1
    table = text.split(leaderboard.START)[1].split(leaderboard.END)[0]
    for lesson in leaderboard.LESSONS:
        assert f"`recipes/{lesson.run}.py`" in table
        assert (REPO / "recipes" / f"{lesson.run}.py").is_file()
