"""The leaderboard writes the README's lesson table and the lesson pages' numbers from the runs' results.json files, and nothing else."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hf_models import GRULMConfig, ModernDecoderConfig
from hf_models.experiments import leaderboard
from hf_models.experiments.scaling import scaling_figures

REPO = Path(__file__).resolve().parents[1]
LESSON_PAGES = REPO / "docs" / "lessons"


def metrics(bpb: float) -> dict:
    return {"loss": bpb * 1.5, "perplexity": 2.0 ** bpb, "bits_per_byte": bpb, "tokens": 100, "bytes": 300}


def write(runs: Path, run: str, payload: dict) -> None:
    (runs / run).mkdir(parents=True, exist_ok=True)
    (runs / run / "results.json").write_text(json.dumps(payload))


def block(text: str, start: str, end: str) -> str:
    return leaderboard.between(text, start, end, "page")


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
    assert rows["1"][4:] == ["—"] * 6  # never run, no committed row: the row stays, with dashes
    assert rows["1"][1] == "[bigram](docs/lessons/01_bigram.md)" and rows["1"][2] == "[`recipes/01_bigram.py`](recipes/01_bigram.py)"
    assert len([r for r in rows if r.isdigit()]) == 12
    assert (tmp_path / "lb.png").stat().st_size > 1000
    # --check: the README now is what the runs give; change a run and it is not.
    assert leaderboard.main(["--runs", str(runs), "--readme", str(readme), "--check"]) == 0
    write(runs, "04_gpt", {"validation": metrics(2.17), "test": metrics(2.2), "parameters": 1, "train_tokens_per_second": 1})
    assert leaderboard.main(["--runs", str(runs), "--readme", str(readme), "--check"]) == 1


def test_a_lesson_without_a_run_keeps_its_committed_row_marked(tmp_path):
    runs, readme = tmp_path / "runs", tmp_path / "README.md"
    write(runs, "03_gru", {"validation": metrics(2.1), "test": metrics(2.2), "parameters": 10, "train_tokens_per_second": 5})
    committed = "| 7 | old | `recipes/07_training.py` | old | 2,188,992 | 9,473 | 2.0149 | 2.0883 | 3.9013 | 49.47 |\n"
    readme.write_text(f"{leaderboard.START}\n{committed}{leaderboard.END}\n")
    assert leaderboard.main(["--runs", str(runs), "--readme", str(readme), "--plot", str(tmp_path / "lb.png")]) == 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in readme.read_text().splitlines() if line.startswith("| ")}
    assert rows["7"][4:] == ["2,188,992", "9,473", "2.0149", "2.0883", "3.9013", "49.47"] and rows["7"][1].endswith(leaderboard.KEPT)
    assert rows["3"][7] == "2.2000" and not rows["3"][1].endswith(leaderboard.KEPT)
    assert f"{leaderboard.KEPT} no `runs/<lesson>/results.json`" in readme.read_text()
    assert leaderboard.main(["--runs", str(runs), "--readme", str(readme), "--check"]) == 0  # kept, not stale


def test_a_readme_without_one_pair_of_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match=r"must hold exactly one <!-- leaderboard:start --> \.\.\. <!-- leaderboard:end --> pair"):
        leaderboard.main(["--runs", str(tmp_path), "--readme", str(readme), "--plot", str(tmp_path / "lb.png")])
    assert readme.read_text() == "no markers\n"


# --- the lesson pages ----------------------------------------------------------------------------------------


def fake_runs(runs: Path) -> None:
    """results.json files shaped as the recipes write them, with numbers no run gives."""
    write(runs, "01_bigram", {"validation": metrics(3.6101), "test": metrics(3.5902), "parameters": 5929, "train_tokens_per_second": 1e6,
                              "train_steps": 1000, "counted_validation_loss": 5.4136, "learned_minus_counted": 0.0016})
    folder = runs / "05_modern_gpt" / "modern-gpt-shakespeare"
    ModernDecoderConfig(vocab_size=2048, hidden_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128).save_pretrained(folder)
    write(runs, "05_modern_gpt", {"validation": metrics(2.0433), "test": metrics(2.1187), "parameters": 2016960,
                                  "train_tokens_per_second": 8515.2, "model_folder": str(folder)})
    write(runs, "08_lora_sft", {"test": metrics(2.3151), "data": {"max_eval_tokens": 20000}, "model_folder": str(folder),
                                "table": "| model | task score |\n|---|---|\n| hand LoRA | 0.2777 |",
                                "tokens_per_second": {"hand loop + hand LoRA": 3000.0, "trl + peft": 2000.0, "hand_over_trl": 1.5}})
    ratio = {"median": 0.5, "q1": 0.45, "q3": 0.55}
    variant = dict(linear_weight_bytes=2**20, model_bytes=2**21, perplexity=52.0, bits_per_byte=2.1, greedy_agreement=1.0,
                   speed_vs_fp32_batch1=ratio, speed_vs_fp32_batch8=ratio, held_out=metrics(2.1))
    write(runs, "09_quantization", {"split": "test", "model_folder": str(folder), "arguments": {"rounds": 5, "threads": 1},
                                    "results": {"hand int8 weight-only": {**variant, "perplexity": 52.0052}, "fp32": variant},
                                    "llama_cpp_q8_0": "not installed"})
    run = lambda bpb, load: {"parameters": 3, "active_parameters": 2, "validation": metrics(bpb), "test": metrics(bpb + 0.1),  # noqa: E731
                             "train_tokens_per_second": 100.0, "final_imbalance": load}
    write(runs, "10_moe", {"validation": metrics(2.28), "test": metrics(2.34), "parameters": 3, "train_tokens_per_second": 100.0,
                           "token_budget": 819200, "moe_beats_dense": False,
                           "runs": {"dense": run(2.2654, None), "MoE + balancing loss": run(2.2800, [1.4444, 1.1])}})
    row = lambda cell, delta, noise: {"cell": cell, "changes": {}, "seeds": 3, "parameters": 1, "bpb_mean": 2.6 + delta,  # noqa: E731
                                      "bpb_std": 0.01, "delta_bpb": delta, "beyond_noise": noise}
    write(runs, "12_ablations", {"validation": metrics(2.51), "parameters": 1000832, "train_tokens_per_second": 1.0, "question": "which?",
                                 "grid": "modern_blocks.yaml", "seeds": [0, 1, 2], "token_budget": 614400, "best_cell": "+ RoPE",
                                 "rows": [row("GPT-2 blocks", 0.0, False), row("+ RoPE", -0.0813, True), row("+ RMSNorm", 0.0079, False)]})


def pages_and_readme(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A README with the table's markers and a page per lesson with its two blocks, committed text in each."""
    readme, pages = tmp_path / "README.md", tmp_path / "docs" / "lessons"
    readme.write_text(f"{leaderboard.START}\n{leaderboard.END}\n")
    pages.mkdir(parents=True)
    for lesson in leaderboard.LESSONS:
        (pages / f"{lesson.run}.md").write_text(
            f"# Lesson {lesson.number}\n\nprose\n\n{leaderboard.RESULTS_START}\ncommitted numbers of {lesson.run}\n{leaderboard.RESULTS_END}\n\n"
            f"more prose\n\n{leaderboard.SCALING_START}\n{leaderboard.SCALING_END}\n\nhow it scales\n")
    return tmp_path / "runs", readme, pages


def test_lesson_pages_are_generated_from_each_lessons_results(tmp_path):
    runs, readme, pages = pages_and_readme(tmp_path)
    fake_runs(runs)
    assert leaderboard.main(["--runs", str(runs), "--readme", str(readme), "--plot", str(tmp_path / "lb.png")]) == 0
    text = {lesson.number: (pages / f"{lesson.run}.md").read_text() for lesson in leaderboard.LESSONS}
    results = {n: block(t, leaderboard.RESULTS_START, leaderboard.RESULTS_END) for n, t in text.items()}
    scaling = {n: block(t, leaderboard.SCALING_START, leaderboard.SCALING_END) for n, t in text.items()}
    for n, page in text.items():  # the prose around the blocks is untouched
        assert page.startswith(f"# Lesson {n}\n\nprose\n\n") and "\n\nmore prose\n\n" in page and page.endswith("\n\nhow it scales\n")

    assert "| test | 3.5902 |" in results[1] and "| learned minus counted | +0.0016 |" in results[1]
    assert "| validation | 2.0433 |" in results[5] and "2,016,960 parameters" in results[5]
    assert "| lesson 4 (GPT decoder) | — | — | — | — |" in results[5]  # lesson 4 never ran: nothing to compare
    assert "| hand LoRA | 0.2777 |" in results[8] and "first 20,000 tokens" in results[8] and "1.50×" in results[8]
    assert "| hand int8 weight-only |" in results[9] and "52.005 (+0.01%)" in results[9] and "0.50× (0.45–0.55)" in results[9]
    assert results[9].index("| fp32 |") < results[9].index("| hand int8 weight-only |")  # the recipe's order, not the file's
    assert "| dense | 3 | 2 | 2.2654 |" in results[10] and "1.44, 1.10" in results[10] and "does not beat" in results[10]
    assert "larger than the seed noise: + RoPE (lower); within it: + RMSNorm" in results[12]
    for lesson in leaderboard.LESSONS:
        assert f"{lesson.run}/results.json" in results[lesson.number] or lesson.number in (2, 3, 4, 6, 7, 11)
        assert "| | " in scaling[lesson.number] and lesson.frontier in scaling[lesson.number]
    # Scaling notes: from the saved folder's config where there is one (lessons 5, 8, 9 and 6, which use lesson 5's
    # model), else from the recipe's defaults; each beside its frontier model.
    for n in (5, 6, 8, 9):
        assert "modern-gpt-shakespeare/config.json" in scaling[n] and "| parameters (total) | 2.02M |" in scaling[n]
    assert "the defaults of `recipes/03_gru.py`" in scaling[3] and "gpt2-xl" in scaling[3]
    assert "mixtral-8x7b" in scaling[10] and "llama-3-8b" in scaling[12] and "llama-2-7b" in scaling[11]

    # A lesson without results.json keeps its committed results block; --check says so and passes.
    for n in (2, 3, 4, 6, 7, 11):
        assert results[n] == f"committed numbers of {leaderboard.BY_NUMBER[n].run}\n"
    assert leaderboard.main(["--runs", str(runs), "--readme", str(readme), "--check"]) == 0

    # --check fails on a stale page, and rewrites nothing.
    page = pages / "01_bigram.md"
    stale = page.read_text().replace("+0.0016", "+0.0999")
    page.write_text(stale)
    assert leaderboard.main(["--runs", str(runs), "--readme", str(readme), "--check"]) == 1
    assert page.read_text() == stale
    # ... and a run newer than its page is stale too.
    write(runs, "03_gru", {"validation": metrics(2.1), "test": metrics(2.2), "parameters": 10, "train_tokens_per_second": 5})
    page.write_text(text[1])
    assert leaderboard.main(["--runs", str(runs), "--readme", str(readme), "--check"]) == 1
    assert leaderboard.main(["--runs", str(runs), "--readme", str(readme), "--plot", str(tmp_path / "lb.png")]) == 0
    assert "| test | 2.2000 |" in (pages / "03_gru.md").read_text()
    assert leaderboard.main(["--runs", str(runs), "--readme", str(readme), "--check"]) == 0


def test_a_page_without_its_blocks_is_refused(tmp_path):
    runs, readme, pages = pages_and_readme(tmp_path)
    (pages / "05_modern_gpt.md").write_text("no blocks\n")
    with pytest.raises(ValueError, match=r"05_modern_gpt.md must hold exactly one <!-- results:start -->"):
        leaderboard.main(["--runs", str(runs), "--readme", str(readme), "--check"])


def test_recipe_defaults_give_the_model_each_lesson_trains():
    """Without a saved model, a lesson's scaling note reads the model config off its recipe's defaults."""
    recipes = REPO / "recipes"
    config, name = leaderboard.default_model(leaderboard.BY_NUMBER[5], recipes)
    assert name == "modern-gpt-shakespeare"
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads, config.max_position_embeddings) == (192, 4, 2, 128)
    config, _ = leaderboard.default_model(leaderboard.BY_NUMBER[3], recipes)
    assert isinstance(config, GRULMConfig) and config.vocab_size == 2048
    config, _ = leaderboard.default_model(leaderboard.BY_NUMBER[10], recipes)
    assert scaling_figures(config).active_parameters < scaling_figures(config).total_parameters  # the experts
    config, cell = leaderboard.default_model(leaderboard.BY_NUMBER[12], recipes)
    assert cell == "all five" and config.positions == "rope" and config.num_key_value_heads == 2
    for lesson in leaderboard.LESSONS:
        if not lesson.model_of:
            scaling_figures(leaderboard.default_model(lesson, recipes)[0])


# --- the repository's own README, pages and recipes -----------------------------------------------------------


def test_the_repositorys_readme_is_a_front_page_with_the_markers_and_every_lesson():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    table = leaderboard.between(text, leaderboard.START, leaderboard.END, "README.md")
    for lesson in leaderboard.LESSONS:
        assert f"`recipes/{lesson.run}.py`" in table and f"(docs/lessons/{lesson.run}.md)" in table
        assert (REPO / "recipes" / f"{lesson.run}.py").is_file()
    for link in re.findall(r"\]\(((?:docs|benchmarks|model_cards)/[^)#]*)", text):
        assert (REPO / link).exists(), link


def test_every_lesson_page_has_a_results_block_and_a_scaling_block():
    for lesson in leaderboard.LESSONS:
        page = LESSON_PAGES / f"{lesson.run}.md"
        text = page.read_text()
        assert text.startswith(f"# Lesson {lesson.number}:")
        leaderboard.between(text, leaderboard.RESULTS_START, leaderboard.RESULTS_END, str(page))
        scaling = leaderboard.between(text, leaderboard.SCALING_START, leaderboard.SCALING_END, str(page))
        assert lesson.frontier in scaling and "| parameters (total) |" in scaling
        prose = text.split(leaderboard.SCALING_END)[1]
        assert len(prose.split()) > 40  # the note ends with how the idea scales, in words


def test_every_recipe_header_links_its_lesson_page():
    for recipe in sorted((REPO / "recipes").glob("[0-9][0-9]_*.py")):
        header = recipe.read_text().split("\n# %%\n")[0]  # the first markdown cell
        assert header.startswith("# %% [markdown]\n# # Lesson")
        assert f"[docs/lessons/{recipe.stem}.md](../docs/lessons/{recipe.stem}.md)" in header, recipe.name
        assert (LESSON_PAGES / f"{recipe.stem}.md").is_file()
    assert {p.stem for p in LESSON_PAGES.glob("*.md")} == {lesson.run for lesson in leaderboard.LESSONS}
