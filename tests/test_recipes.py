"""Every recipe runs end to end (tiny settings) and leaves what a Hub user needs in its folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_models.data import load_corpus

REPO = Path(__file__).resolve().parents[1]
TINY_TRAINING = ["--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2", "--per_device_train_batch_size", "2",
                 "--max_eval_tokens", "1500", "--sample_tokens", "8", "--disable_tqdm", "true"]
RECIPES = {
    "01_bigram": [],
    "02_ngram_mlp": ["--vocab_size", "300", "--hidden_size", "32", "--embedding_dim", "8", "--block_size", "32"],
    "03_gru": ["--vocab_size", "300", "--hidden_size", "32", "--block_size", "32"],
    "04_gpt": ["--tokenizer", "bpe", "--vocab_size", "300", "--hidden_size", "32", "--num_hidden_layers", "2", "--block_size", "32"],
    "05_modern_gpt": ["--tokenizer", "bpe", "--vocab_size", "300", "--hidden_size", "32", "--num_hidden_layers", "2", "--block_size", "32"],
    "10_moe": ["--tokenizer", "bpe", "--vocab_size", "300", "--hidden_size", "32", "--num_hidden_layers", "2", "--block_size", "32",
               "--num_local_experts", "4", "--expert_intermediate_size", "32", "--load_every", "2", "--timing_rounds", "2"],
}


@pytest.fixture(scope="module")
def small_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(load_corpus("shakespeare")["validation"][0]["text"][:40_000])
    return path


def run_recipe(name: str, extra: list[str], small_text_file: Path, tmp_path: Path, launcher: list[str] | None = None):
    output_dir, card = tmp_path / "run", tmp_path / "card.md"
    command = (launcher or [sys.executable]) + [
        str(REPO / "recipes" / f"{name}.py"), "--dataset", "text", "--data_files", str(small_text_file),
        "--output_dir", str(output_dir), "--model_name", "tiny", "--card_copy", str(card), *TINY_TRAINING, *extra,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODELS_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return output_dir, card, result.stdout


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_and_saves_a_complete_folder(name, small_text_file, tmp_path):
    output_dir, card, stdout = run_recipe(name, RECIPES[name], small_text_file, tmp_path)

    results = json.loads((output_dir / "results.json").read_text())
    validation = results["validation"]
    assert {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"} <= set(validation)
    assert 0 < validation["bits_per_byte"] < 16 and validation["tokens"] > 100
    assert results["train_tokens_per_second"] > 0
    assert isinstance(results["sample"], str) and len(results["sample"]) > 0
    assert "bits per byte" in stdout and "saved to" in stdout

    folder = output_dir / "tiny"
    files = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= files
    assert any(f.startswith("modeling_") for f in files) and any(f.startswith("configuration_") for f in files)
    assert "auto_map" in json.loads((folder / "config.json").read_text())
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]

    # The model card: YAML metadata with the measured numbers, and the copy the recipe writes.
    text = (folder / "README.md").read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["library_name"] == "transformers" and "hf_models" in metadata["tags"]
    metrics = {m["type"]: m["value"] for r in metadata["model-index"][0]["results"] for m in r["metrics"]}
    assert metrics["bits_per_byte"] == pytest.approx(validation["bits_per_byte"], rel=1e-5)
    assert "## Intended use" in text and "## Limitations" in text and "## Training" in text
    assert card.read_text() == text

    if name in ("04_gpt", "05_modern_gpt"):
        export = json.loads((output_dir / f"tiny-{'gpt2' if name == '04_gpt' else 'llama'}" / "config.json").read_text())
        assert export["model_type"] == ("gpt2" if name == "04_gpt" else "llama") and "auto_map" not in export

    if name == "10_moe":  # three runs side by side, the expert load plotted, the timing against Mixtral
        runs = results["runs"]
        assert set(runs) == {"dense", "MoE + balancing loss", "MoE, no balancing loss"}
        assert runs["dense"]["active_parameters"] < runs["MoE + balancing loss"]["active_parameters"] < results["parameters"]
        assert all(0 < run["validation"]["bits_per_byte"] < 16 and run["train_tokens_per_second"] > 0 for run in runs.values())
        load = runs["MoE + balancing loss"]["expert_load"]
        assert sorted(int(step) for step in load) == [2, 4] and all(abs(sum(row) - 1) < 1e-9 for row in load["4"])
        timing = results["training_step_timing"]
        assert timing["fp32_logits_gap_moe_vs_mixtral"] < 1e-4 and timing["moe_vs_mixtral"]["median"] > 0
        assert (output_dir / "expert_load.png").stat().st_size > 0



@pytest.mark.parametrize(
    ("name", "flags", "message"),
    [
        ("01_bigram", ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0 is not allowed"),
        ("04_gpt", ["--block_size", "4", "--hidden_size", "32", "--num_hidden_layers", "1"], "--block_size 4 (the model's context)"),
    ],
)
def test_recipe_refuses_a_flag_that_cannot_work_before_training(name, flags, message, small_text_file, tmp_path):
    """A mistake that used to surface after minutes of training (or after the save) stops the recipe first."""
    command = [sys.executable, str(REPO / "recipes" / f"{name}.py"), "--dataset", "text", "--data_files", str(small_text_file),
               "--output_dir", str(tmp_path / "run"), "--max_steps", "2", *flags]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODELS_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
    assert "train_runtime" not in result.stdout + result.stderr and not list((tmp_path / "run").glob("*/config.json"))

def test_recipe_runs_under_accelerate_launch(small_text_file, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's launcher is installed with the package"
    launcher = [accelerate, "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    output_dir, _, _ = run_recipe("01_bigram", [], small_text_file, tmp_path, launcher)
    assert json.loads((output_dir / "results.json").read_text())["validation"]["loss"] > 0


def test_recipes_print_help():
    for name in RECIPES:
        result = subprocess.run([sys.executable, str(REPO / "recipes" / f"{name}.py"), "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "--dataset" in result.stdout and "--push_to_hub" in result.stdout


def test_kv_cache_lesson_times_every_cache_on_a_saved_model(tmp_path):
    """Lesson 6 loads lesson 5's folder; all six ways to generate, the compiled one included, give the same tokens and are timed."""
    from hf_models import ModernDecoderConfig, ModernDecoderForCausalLM

    config = ModernDecoderConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    ModernDecoderForCausalLM(config).save_pretrained(tmp_path / "lesson5")
    output_dir = tmp_path / "run"
    command = [sys.executable, str(REPO / "recipes" / "06_kv_cache.py"), "--model_folder", str(tmp_path / "lesson5"),
               "--output_dir", str(output_dir), "--total_tokens", "48", "--batch_size", "2", "--rounds", "2"]
    result = subprocess.run(command, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    results = json.loads((output_dir / "results.json").read_text())
    rows = results["results"]
    assert set(rows) == {"no cache", "GrowingKVCache", "StaticKVCache", "DynamicCache", "StaticCache", "StaticKVCache, compiled"}
    for name, row in rows.items():
        assert row["same_tokens"], f"{name} generated different tokens than generation without a cache"
        assert row["tokens_per_second"] > 0
    assert "speedup_vs_dynamic_cache" in rows["GrowingKVCache"] and "speedup_vs_dynamic_cache" in rows["StaticKVCache, compiled"]
    assert results["timings"]["rounds"] == 2 and all(len(s) == 2 for s in results["timings"]["seconds"].values())
    assert results["machine"]["torch_threads"] == 1
    assert results["kv_cache_memory"]["bytes_per_token"] == 2 * 2 * 2 * 8 * 4  # k and v x layers x kv heads x head_dim x fp32
    assert (output_dir / "tokens_per_second.png").stat().st_size > 0


def test_training_lesson_compares_the_hand_loop_with_trainer_and_saves_the_tuned_model(small_text_file, tmp_path):
    """Lesson 7 with tiny settings: hand loop = Trainer, the tricks table, the tuned model saved with its card."""
    extra = RECIPES["04_gpt"] + ["--compare_steps", "20", "--tricks_steps", "8"]
    output_dir, card, stdout = run_recipe("07_training", extra, small_text_file, tmp_path)
    results = json.loads((output_dir / "results.json").read_text())
    compare = results["hand_loop_vs_trainer"]
    assert compare["within_tolerance"] and compare["max_abs_difference"] <= 1e-4 and compare["steps"] == [10, 20]
    assert compare["hand_loop_tokens_per_second"] > 0 and compare["trainer_tokens_per_second"] > 0
    rows = results["tricks"]["rows"]
    assert len(rows) == 5 and all(0 < row["validation_bits_per_byte"] < 16 for row in rows.values())
    assert rows["activation checkpointing"]["activation_mib"] < rows["warm-up + cosine"]["activation_mib"]
    assert rows["bf16 autocast"]["activation_mib"] < rows["warm-up + cosine"]["activation_mib"]
    assert "validation" in results and results["train_steps"] == 4  # (--dataset text has no test split)
    assert (output_dir / "training.png").stat().st_size > 0 and (output_dir / "tiny" / "model.safetensors").exists()
    assert "hand loop vs Trainer" in stdout


def run_quantization_lesson(model, tokenizer, small_text_file: Path, tmp_path: Path, max_eval_tokens: int):
    """Lesson 9 with tiny settings on ``model``, saved with ``tokenizer``: ``(output_dir, completed process)``."""
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    output_dir = tmp_path / "run"
    command = [sys.executable, str(REPO / "recipes" / "09_quantization.py"), "--model", str(tmp_path / "model"),
               "--dataset", "text", "--data_files", str(small_text_file), "--output_dir", str(output_dir),
               "--max_eval_tokens", str(max_eval_tokens), "--prompts", "2", "--prompt_tokens", "8", "--new_tokens", "4",
               "--rounds", "1", "--layer_width", "64"]
    result = subprocess.run(command, cwd=tmp_path, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return output_dir, result


def test_quantization_lesson_compares_every_int8_variant_and_saves_a_quantized_folder(small_text_file, tmp_path):
    """Lesson 9 with tiny settings on a small trained-shape model: the seven-row table, the outlier
    story, and an int8 folder that reloads quantized."""
    from transformers import AutoModelForCausalLM

    from hf_models import ModernDecoderConfig, ModernDecoderForCausalLM
    from hf_models.int8 import Int8Linear
    from hf_models.tokenization import build_char_tokenizer

    tokenizer = build_char_tokenizer(small_text_file.read_text())
    config = ModernDecoderConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64)  # bitsandbytes' CPU NF4 needs width >= 64
    output_dir, result = run_quantization_lesson(ModernDecoderForCausalLM(config), tokenizer, small_text_file, tmp_path, max_eval_tokens=400)

    results = json.loads((output_dir / "results.json").read_text())
    rows = results["results"]
    assert set(rows) == {"fp32", "bf16", "hand int8 weight-only", "hand LLM.int8()", "hand W8A8", "bitsandbytes int8", "bitsandbytes NF4"}
    fp32 = rows["fp32"]
    for name, row in rows.items():
        assert 0 < row["bits_per_byte"] < 16 and 0 <= row["greedy_agreement"] <= 1
        assert row["tokens_per_second_batch1"] > 0 and row["speed_vs_fp32_batch2"]["median"] > 0
    assert fp32["greedy_agreement"] == 1 and rows["hand int8 weight-only"]["linear_weight_bytes"] < 0.3 * fp32["linear_weight_bytes"]
    assert set(results["single_layer_speed_vs_fp32"]["1"]) == set(rows) - {"bitsandbytes NF4"}
    assert results["outliers"]["injected"]["llm_int8"] < results["outliers"]["injected"]["absmax_int8"]
    assert isinstance(results["llama_cpp_q8_0"], (dict, str))
    assert "llama.cpp Q8_0" in result.stdout and "outliers in this model" in result.stdout

    folder = Path(results["int8_folder"])
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "zoo_int8"
    assert "## Limitations" in (folder / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, Int8Linear)


def test_quantization_lesson_says_the_moe_experts_stay_in_full_precision(small_text_file, tmp_path):
    """Lesson 9 on a tiny mixture of experts: bitsandbytes and the hand int8 swap nn.Linear layers only, so the experts'
    3-D weights stay unquantized; the recipe prints which, records their dtype per variant, and the card says it."""
    from hf_models import MoEDecoderConfig, MoEDecoderForCausalLM
    from hf_models.tokenization import build_char_tokenizer

    tokenizer = build_char_tokenizer(small_text_file.read_text())
    config = MoEDecoderConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    output_dir, result = run_quantization_lesson(MoEDecoderForCausalLM(config), tokenizer, small_text_file, tmp_path, max_eval_tokens=300)
    assert ("MoE model: its 4 expert weights (down_proj, gate_up_proj: 3-D, 98,304 parameters" in result.stdout
            and "leave them unquantized, in full precision: bfloat16 in bf16; float32 in fp32, hand int8 weight-only" in result.stdout)
    experts = json.loads((output_dir / "results.json").read_text())["experts"]
    assert experts["dtype_per_variant"]["bitsandbytes NF4"] == experts["dtype_per_variant"]["bitsandbytes int8"] == ["float32"]
    assert "the experts (3-D weights, not nn.Linear) stay in float32" in (output_dir / "modern-gpt-shakespeare-int8" / "README.md").read_text()


def test_dpo_lesson_trains_with_trl_and_the_hand_loop_and_saves_the_aligned_model(tmp_path):
    """Lesson 11 with tiny settings from a tiny saved SFT model: a missing SFT model is refused with the
    recipe to run; both trainers train on the same pairs and their held-out curves agree; the
    before/after table, the plot, tokens/s and a folder that loads and generates."""
    from transformers import AutoModelForCausalLM

    from hf_models import ModernDecoderConfig, ModernDecoderForCausalLM
    from hf_models.data import add_chat_template
    from hf_models.tokenization import build_char_tokenizer

    tokenizer = add_chat_template(build_char_tokenizer(load_corpus("shakespeare")["train"][0]["text"]))
    sft = tmp_path / "sft"
    config = ModernDecoderConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256)
    ModernDecoderForCausalLM(config).save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    recipe = [sys.executable, str(REPO / "recipes" / "11_dpo.py")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    missing = subprocess.run(recipe + ["--sft_model", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "x")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "recipes/08_lora_sft.py" in missing.stderr

    output_dir = tmp_path / "run"
    command = recipe + ["--sft_model", str(sft), "--output_dir", str(output_dir), "--card_copy", str(tmp_path / "card.md"),
                        "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2", "--per_device_train_batch_size", "2",
                        "--max_length", "256", "--max_eval_pairs", "8", "--curve_eval_pairs", "4", "--max_eval_tokens", "1500",
                        "--timing_rounds", "1", "--sample_tokens", "8", "--disable_tqdm", "true", "--model_name", "tiny"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    results = json.loads((output_dir / "results.json").read_text())
    for row in ("before", "after_trl", "after_hand"):
        assert {"rewards/accuracies", "rewards/margins", "likelihood_accuracy", "loss"} <= set(results[row])
        assert 0 < results[row]["held_out_text"]["test"]["bits_per_byte"] < 16
    assert results["before"]["rewards/margins"] == 0  # the SFT model is its own reference
    assert results["after_hand"]["rewards/margins"] != 0
    assert results["curves_max_margin_difference"] < 1e-4  # same pairs, same order: the two trainers agree
    assert results["tokens_per_second"]["trl"] > 0 and results["tokens_per_second"]["hand"] > 0
    assert (output_dir / "dpo_curves.png").stat().st_size > 0
    assert "reward accuracy" in (tmp_path / "card.md").read_text() and isinstance(results["sample"], str)
    AutoModelForCausalLM.from_pretrained(output_dir / "tiny")


def save_tiny_lora_base(folder: Path):
    """A tiny untrained modern decoder with a character tokenizer over the next-line task, saved as lesson 8's base."""
    from hf_models import ModernDecoderConfig, ModernDecoderForCausalLM
    from hf_models.data import build_instruction_dataset
    from hf_models.tokenization import build_char_tokenizer

    conversations = build_instruction_dataset(max_rows=40)
    text = "<user>\n<line>\n" + "\n".join(m["content"] for split in conversations.values() for ms in split["messages"] for m in ms)
    tokenizer = build_char_tokenizer(text)
    config = ModernDecoderConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id)
    ModernDecoderForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_lora_sft_lesson_counts_every_process_in_its_global_batch(tmp_path, monkeypatch):
    """Under ``accelerate launch --num_processes 2`` every optimizer step reads per-device x accumulation x 2
    conversations, so lesson 8 draws twice the rows it draws on one process (it once left the processes out,
    and the hand loop then cycled through half the data twice). Runs the recipe's cells up to its data
    arithmetic, in-process, with ``TrainingArguments.world_size`` at 2, as accelerate sets it."""
    import runpy

    from transformers import TrainingArguments

    import hf_models.recipe_support

    save_tiny_lora_base(tmp_path / "base")
    recipe = str(REPO / "recipes" / "08_lora_sft.py")

    class DataArithmeticDone(Exception):
        pass

    seen = {}

    def stop_after_the_data_arithmetic(data_args):  # the recipe's next call: load the held-out corpus
        seen.update(sys._getframe(1).f_globals)
        raise DataArithmeticDone

    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    monkeypatch.setattr(hf_models.recipe_support, "load_lesson_corpus", stop_after_the_data_arithmetic)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # else use_passive_omp_wait() restarts this process
    monkeypatch.setenv("HF_MODELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", [recipe, "--base_model", str(tmp_path / "base"), "--output_dir", str(tmp_path / "run"),
                                      "--max_steps", "3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                                      "--max_length", "256", "--bf16", "false"])
    with pytest.raises(DataArithmeticDone):
        runpy.run_path(recipe, run_name="__main__")
    assert seen["training_args"].world_size == 2
    assert seen["batch"] == 2 * 2 * 2  # per device x accumulation x processes
    assert len(seen["train"]) == len(seen["train_ids"]) == 3 * 8  # max_steps global batches, no example read twice


def test_lora_sft_lesson_fine_tunes_with_trl_and_by_hand(small_text_file, tmp_path):
    """Lesson 8 with tiny settings: base, trl + peft and hand LoRA scored side by side; the hand adapter is
    saved alone, converted to peft's format (which reloads to the merged model's logits) and merged into a folder."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = save_tiny_lora_base(tmp_path / "base")
    output_dir = tmp_path / "run"
    command = [sys.executable, str(REPO / "recipes" / "08_lora_sft.py"), "--base_model", str(tmp_path / "base"),
               "--dataset", "text", "--data_files", str(small_text_file), "--output_dir", str(output_dir), "--model_name", "tiny",
               "--card_copy", str(tmp_path / "card.md"), "--max_steps", "3", "--per_device_train_batch_size", "2", "--max_length", "256",
               "--eval_rows", "3", "--max_new_tokens", "4", "--max_eval_tokens", "500", "--sample_tokens", "4", "--bf16", "false",
               "--lora_rank", "4", "--disable_tqdm", "true"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODELS_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    results = json.loads((output_dir / "results.json").read_text())
    for key in ("before", "after_peft", "after_hand"):
        assert results[key]["task"]["count"] == 3 and results[key]["response"]["tokens"] > 0
        assert 0 < results[key]["held_out_text"]["validation"]["bits_per_byte"] < 16
    assert results["trainable_parameters"]["hand"] == results["trainable_parameters"]["peft"]  # same targets, same rank
    assert results["tokens_per_second"]["hand_over_trl"] > 0 and "hand LoRA + lesson 7 loop" in result.stdout

    merged_folder = Path(results["model_folder"])
    merged = AutoModelForCausalLM.from_pretrained(merged_folder).eval()
    assert AutoTokenizer.from_pretrained(merged_folder).chat_template is not None
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    adapted = PeftModel.from_pretrained(base, results["adapters"]["hand-peft"]).eval()
    ids = torch.tensor([tokenizer.encode("<user>\nPlay: Macbeth\n<line>\n")])
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert (Path(results["adapters"]["trl-peft"]) / "adapter_config.json").exists()


def test_lessons_8_and_11_start_from_a_stock_checkpoint(small_text_file, tmp_path):
    """Lesson 8 on a random-weight Qwen2 checkpoint in the Hub layout (config.json, model.safetensors, tokenizer.json, its
    chat template), then lesson 11 on lesson 8's run: the base is loaded into the zoo's own class, keeps its tokenizer and
    (marked for training by trl) its chat template, and the tables name it by what it is."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_models import ModernDecoderForCausalLM
    from tests.helpers import save_stock_twin

    save_stock_twin("qwen2", tmp_path / "Qwen2-twin")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODELS_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false")
    sft_run = tmp_path / "sft"
    command = [sys.executable, str(REPO / "recipes" / "08_lora_sft.py"), "--base_model", str(tmp_path / "Qwen2-twin"),
               "--dataset", "text", "--data_files", str(small_text_file), "--output_dir", str(sft_run), "--model_name", "tiny",
               "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "512", "--eval_rows", "2",
               "--max_new_tokens", "4", "--max_eval_tokens", "300", "--sample_tokens", "4", "--bf16", "false", "--lora_rank", "4",
               "--disable_tqdm", "true"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads((sft_run / "results.json").read_text())
    assert results["base"] == "qwen2 checkpoint Qwen2-twin" and "| base (qwen2 checkpoint Qwen2-twin) |" in results["table"]
    assert results["chat_template"] == "the base's own chat template, with trl's {% generation %} markers"
    converted = AutoModelForCausalLM.from_pretrained(results["base_model"])
    assert type(converted) is ModernDecoderForCausalLM and converted.config.attention_bias  # the zoo's class, Qwen2's biases
    sft_folder = Path(results["model_folder"])
    saved = AutoTokenizer.from_pretrained(sft_folder)
    assert "<|im_start|>" in saved.chat_template and "{% generation %}" in saved.chat_template  # Qwen2.5's, marked
    assert saved.get_vocab() == AutoTokenizer.from_pretrained(tmp_path / "Qwen2-twin").get_vocab()
    assert json.loads((sft_folder / "config.json").read_text())["tokenizer_identity"]["vocab_size"] == len(saved)

    dpo_run = tmp_path / "dpo"
    command = [sys.executable, str(REPO / "recipes" / "11_dpo.py"), "--sft_model", str(sft_run), "--output_dir", str(dpo_run),
               "--model_name", "tiny", "--max_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--per_device_train_batch_size", "2",
               "--max_length", "512", "--max_eval_pairs", "4", "--curve_eval_pairs", "2", "--max_eval_tokens", "300",
               "--timing_rounds", "1", "--sample_tokens", "4", "--disable_tqdm", "true"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    results = json.loads((dpo_run / "results.json").read_text())
    assert results["start"] == "zoo_modern folder tiny, from qwen2 checkpoint Qwen2-twin"
    assert "| start: zoo_modern folder tiny, from qwen2 checkpoint Qwen2-twin (before) |" in results["table"]
    assert type(AutoModelForCausalLM.from_pretrained(dpo_run / "tiny")) is ModernDecoderForCausalLM


def test_lora_sft_lesson_adapts_every_expert_of_a_mixtral_checkpoint(small_text_file, tmp_path):
    """Lesson 8 on a random-weight Mixtral checkpoint: its experts are 3-D weights, which peft's LoRA and the hand LoRA
    both reach through target_parameters (one adapter per expert weight and layer, the same trainable count), with
    lora_dropout 0 chosen and said, since peft refuses dropout there; the hand adapter, converted to peft's format,
    reloads to the merged model's logits. An explicit --lora_dropout above 0 is refused by name before conversion."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import save_stock_twin

    twin = save_stock_twin("mixtral", tmp_path / "Mixtral-twin")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODELS_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(REPO / "recipes" / "08_lora_sft.py"), "--base_model", str(tmp_path / "Mixtral-twin"),
               "--dataset", "text", "--data_files", str(small_text_file), "--model_name", "tiny",
               "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "512", "--eval_rows", "2",
               "--max_new_tokens", "4", "--max_eval_tokens", "300", "--sample_tokens", "4", "--bf16", "false", "--lora_rank", "4",
               "--disable_tqdm", "true"]
    refused = subprocess.run(command + ["--output_dir", str(tmp_path / "refused"), "--lora_dropout", "0.1"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "--lora_dropout 0.1 cannot be used with --base_model" in refused.stderr, refused.stderr[-3000:]
    assert "experts.gate_up_proj" in refused.stderr and "Allowed on an MoE base: --lora_dropout 0" in refused.stderr
    assert not (tmp_path / "refused" / "converted").exists()

    output_dir = tmp_path / "sft"
    result = subprocess.run(command + ["--output_dir", str(output_dir)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "MoE base: LoRA also adapts every expert (experts.down_proj, experts.gate_up_proj" in result.stdout
    assert "with lora_dropout 0" in result.stdout
    results = json.loads((output_dir / "results.json").read_text())
    layers = twin.config.num_hidden_layers
    assert results["lora_dropout"] == 0 and results["expert_adapters"] == {"peft": 2 * layers, "hand": 2 * layers}
    assert results["trainable_parameters"]["hand"] == results["trainable_parameters"]["peft"]

    merged = AutoModelForCausalLM.from_pretrained(results["model_folder"]).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(results["base_model"]), results["adapters"]["hand-peft"]).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(tmp_path / "Mixtral-twin").encode("ROMEO:\nBut soft")])
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_moe_lesson_continues_a_mixtral_checkpoint(small_text_file, tmp_path):
    """Lesson 10 from a random-weight Mixtral checkpoint in the Hub layout: both MoE runs start from its weights and
    train on the corpus tokenized with its own tokenizer, the dense run is built at its shape from scratch, the Mixtral
    timing still runs, and every table says where each run started. The learning rate is 1e-12, so the saved MoE must
    still compute the checkpoint's own logits: it started from those weights, not from a fresh init."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_models import MoEDecoderForCausalLM
    from tests.helpers import save_stock_twin, stock_twin_config

    twin = save_stock_twin("mixtral", tmp_path / "Mixtral-twin")
    flags = ["--block_size", "32", "--load_every", "2", "--timing_rounds", "2", "--learning_rate", "1e-12",
             "--base_model", str(tmp_path / "Mixtral-twin")]
    output_dir, card, stdout = run_recipe("10_moe", flags, small_text_file, tmp_path)

    results = json.loads((output_dir / "results.json").read_text())
    start = "from mixtral checkpoint Mixtral-twin"
    assert results["base"] == "mixtral checkpoint Mixtral-twin" and results["start"] == f"MoE {start}; dense from scratch"
    assert Path(results["base_model"]) == output_dir / "converted" / "Mixtral-twin"
    runs = results["runs"]
    assert {name: run["start"] for name, run in runs.items()} == {"dense": "from scratch", "MoE + balancing loss": start,
                                                                  "MoE, no balancing loss": start}
    assert f"MoE + balancing loss ({start})" in stdout and "start: MoE from mixtral checkpoint Mixtral-twin; dense from scratch" in stdout
    assert f"Continued pretraining: MoE {start}" in card.read_text() and "dense model from scratch" in card.read_text()
    timing = results["training_step_timing"]
    assert timing["fp32_logits_gap_moe_vs_mixtral"] < 1e-4 and timing["moe_vs_mixtral"]["median"] > 0

    # The checkpoint's shape for all three runs: the dense SwiGLU is k experts wide, so the active parameters match
    # but for the router.
    shape = stock_twin_config("mixtral", twin.config.vocab_size)
    saved = AutoModelForCausalLM.from_pretrained(output_dir / "tiny").eval()
    assert type(saved) is MoEDecoderForCausalLM
    assert (saved.config.hidden_size, saved.config.num_local_experts, saved.config.head_dim) == (shape.hidden_size, 4, 16)
    router = shape.num_hidden_layers * shape.hidden_size * shape.num_local_experts
    assert runs["dense"]["active_parameters"] + router == runs["MoE + balancing loss"]["active_parameters"]

    # The vocabulary is the checkpoint's tokenizer's, and the data was tokenized with it.
    twin_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "Mixtral-twin")
    assert AutoTokenizer.from_pretrained(output_dir / "tiny").get_vocab() == twin_tokenizer.get_vocab()
    assert saved.config.vocab_size == twin.config.vocab_size

    # Started from the checkpoint's weights: at a learning rate of 1e-12, four steps leave transformers' own logits.
    ids = torch.tensor([twin_tokenizer.encode("ROMEO:\nBut soft, what light")])
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, twin(input_ids=ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("flags", "message"), [
    ([], "is a 'llama' model; this lesson starts only from one of model_type ['zoo_moe', 'mixtral']"),
    (["--hidden_size", "32", "--tokenizer=bpe"], "sets the model's shape and tokenizer, so --tokenizer, --hidden_size cannot be given"),
])
def test_moe_lesson_refuses_a_base_model_it_cannot_continue(flags, message, small_text_file, tmp_path):
    """--base_model must name an MoE (a zoo_moe folder or a Mixtral checkpoint), and the checkpoint sets the shape: a
    dense Llama, or shape flags typed beside it, stop the recipe before any conversion, data or training."""
    from tests.helpers import save_stock_twin

    save_stock_twin("llama" if not flags else "mixtral", tmp_path / "twin")
    command = [sys.executable, str(REPO / "recipes" / "10_moe.py"), "--dataset", "text", "--data_files", str(small_text_file),
               "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--base_model", str(tmp_path / "twin"), *flags]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODELS_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and message in result.stderr and "--base_model" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run" / "converted").exists() and not (tmp_path / "cache").exists()
