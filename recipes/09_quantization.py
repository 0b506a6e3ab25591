# %% [markdown]
# # Lesson 9: INT8 quantization by hand, next to bitsandbytes and llama.cpp, on lesson 5's model.
#
# Explained, with its measured numbers and how it scales to frontier models:
# [docs/lessons/09_quantization.md](../docs/lessons/09_quantization.md).
#
# What the lesson shows
# ---------------------
# 1. Seven ways to hold the same trained model: fp32, bf16, the hand-written int8 of
#    ``hf_models/int8.py`` in three schemes (weight-only, LLM.int8(), W8A8), and bitsandbytes' int8
#    and NF4, each loaded the way a user loads it: ``from_pretrained(folder, quantization_config=...)``.
#    Plus llama.cpp's Q8_0 (GGUF export, ``hf_models.conversion.gguf``) when llama-cpp-python is installed.
# 2. One table: memory of the quantized linear layers (the tied LM head is the embedding, kept in
#    fp32 and counted with the whole model) and of the whole model; held-out perplexity and bits per byte with the
#    change against fp32; greedy-generation tokens/s at batch 1 and 8 as ratios to fp32, timed side
#    by side in interleaved rounds (``hf_models.benchmarking.time_interleaved``); and how many greedy
#    tokens each variant shares with fp32 over a fixed set of held-out prompts.
# 3. Int8 *compute*: one linear layer of a realistic width, every scheme timed against fp32.
# 4. The outlier story of LLM.int8() (Dettmers et al. 2022): where this model's activations exceed
#    the 6.0 threshold, and what happens to per-token absmax int8 when a few features are 60x larger
#    than the rest (as they are in every layer of models past ~6.7B parameters), against the
#    decomposition that multiplies those columns in floating point.
# 5. The int8 model saved as a folder with its card: it reloads quantized with ``from_pretrained``
#    (also with ``trust_remote_code`` where hf_models is not installed).
#
# A mixture of experts (lesson 10, a Mixtral checkpoint) keeps its experts as 3-D weights (E, out, in),
# not ``nn.Linear`` layers. bitsandbytes' int8 and NF4 replace ``nn.Linear`` layers only, and so does the
# hand int8, so **the experts stay in full precision** in every variant here (in bf16 in the bf16 row):
# the recipe prints which tensors, how many parameters, and their dtype in each variant. The table's
# "linear MB" leaves them out; "model MB" counts them. Quantizing experts needs a kernel for 3-D
# weights (e.g. llama.cpp's GGUF quantizes Mixtral's experts; bitsandbytes does not).
#
# Threads: one by default (a shared 2-core machine; see lesson 6).
#
# Run:
#     python recipes/09_quantization.py                        # a few minutes on 2 CPU cores
#     python recipes/09_quantization.py --model path/to/any/zoo/decoder/folder
#     python recipes/09_quantization.py --model Qwen/Qwen2.5-0.5B   # a stock checkpoint, in the zoo's own class

# %%
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, HfArgumentParser

from hf_models import ZooInt8Config
from hf_models.benchmarking import PairedRatio, describe_machine, time_interleaved
from hf_models.data import split_token_ids
from hf_models.evaluation import evaluate_token_stream
from hf_models.files import save_folder_atomically, write_json_atomically
from hf_models.int8 import DEFAULT_THRESHOLD, Int8Linear, absmax_quantize, llm_int8_matmul, outlier_columns, w8a8_matmul
from hf_models.tokenization import load_tokenizer_for, token_byte_lengths, tokenizer_for_saving
from hf_models.recipe_support import DataArguments, build_model_card, expert_weights, load_lesson_corpus, recipe_argv, resolve_model_source
from hf_models.recipe_support.validation import check_counts, check_output_dir_writable


@dataclass
class QuantizationArguments:
    model: str = field(default="runs/05_modern_gpt/modern-gpt-shakespeare", metadata={"help": (
        "A trained zoo decoder folder (lesson 5's by default), or a stock gpt2/llama/qwen2/mixtral checkpoint, a folder or a Hub id.")})
    output_dir: str = field(default="runs/09_quantization", metadata={"help": "Where results.json and the int8 folder go."})
    model_name: str = field(default="modern-gpt-shakespeare-int8", metadata={"help": "Name of the saved int8 folder."})
    saved_scheme: str = field(default="weight_only", metadata={"help": "The hand scheme of the saved int8 folder."})
    prompts: int = field(default=8, metadata={"help": "Held-out prompts for the agreement and batch-8 timing."})
    prompt_tokens: int = field(default=16, metadata={"help": "Tokens per prompt."})
    new_tokens: int = field(default=32, metadata={"help": "Greedy tokens generated per prompt."})
    rounds: int = field(default=5, metadata={"help": "Timed rounds (each runs every variant once, in rotating order)."})
    threads: int = field(default=1, metadata={"help": "torch threads."})
    layer_width: int = field(default=1024, metadata={"help": "Width of the single linear layer timed for int8 compute."})


# ----------------------------------------------------------------------------- the seven variants

# name -> from_pretrained keyword arguments. Everything is loaded from the same folder, as a user would.
VARIANTS: dict[str, dict] = {
    "fp32": {},
    "bf16": dict(dtype=torch.bfloat16),
    "hand int8 weight-only": dict(quantization_config=ZooInt8Config(scheme="weight_only")),
    "hand LLM.int8()": dict(quantization_config=ZooInt8Config(scheme="llm_int8", threshold=DEFAULT_THRESHOLD)),
    "hand W8A8": dict(quantization_config=ZooInt8Config(scheme="w8a8")),
    "bitsandbytes int8": dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"),
    "bitsandbytes NF4": dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), device_map="cpu"),
}


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights and quantization constants of the linear layers that quantization converts.

    The LM head is left out: it is the token embedding itself (tied), kept in full precision by
    every scheme here, and counted in the whole-model footprint.
    """
    head = model.get_output_embeddings()
    total = 0
    for module in model.modules():
        if module is head:
            continue
        if isinstance(module, Int8Linear):
            total += module.weight.nbytes + module.weight_scale.nbytes
        elif isinstance(module, torch.nn.Linear):
            weight = module.weight
            total += weight.nbytes
            total += getattr(getattr(weight, "SCB", None), "nbytes", 0)  # bitsandbytes int8: one absmax per row
            quant_state = getattr(weight, "quant_state", None)  # bitsandbytes 4-bit: one absmax per block of 64
            if quant_state is not None:
                total += quant_state.absmax.nbytes
    return total


def held_out_prompts(token_ids: torch.LongTensor, count: int, length: int) -> torch.LongTensor:
    """(count, length) windows spread evenly over the held-out stream: a fixed prompt set."""
    starts = torch.linspace(0, token_ids.numel() - length - 1, count).long()
    return torch.stack([token_ids[start : start + length] for start in starts.tolist()])


def greedy(model, prompts: torch.LongTensor, new_tokens: int) -> torch.LongTensor:
    """Exactly ``new_tokens`` greedy tokens per prompt (no EOS stop): (B, new_tokens)."""
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    return out[:, prompts.shape[1] :]


# ----------------------------------------------------------------------------- the outlier story


@torch.no_grad()
def outlier_story(model, prompts: torch.LongTensor) -> dict:
    """Every linear layer's real inputs: how many features reach ``|x| >= 6``, and the error of
    per-token absmax int8 against the LLM.int8() decomposition, then the same with 3 injected
    outlier features (60x) on the layer with the largest input."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, args[0].reshape(-1, args[0].shape[-1])))
             for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and name != "lm_head"]
    model(prompts)
    for hook in hooks:
        hook.remove()

    def errors(name: str, x: torch.Tensor) -> dict:
        weight = model.get_submodule(name).weight
        codes, scale = absmax_quantize(weight)
        exact = x @ (codes.float() * scale[:, None]).T  # the int8 weights in fp: only the activation error remains
        norm = exact.norm().item()
        return dict(absmax_int8=(w8a8_matmul(x, codes, scale) - exact).norm().item() / norm,
                    llm_int8=(llm_int8_matmul(x, codes, scale) - exact).norm().item() / norm,
                    outlier_features=int(outlier_columns(x, DEFAULT_THRESHOLD).numel()),
                    max_abs_activation=x.abs().max().item())

    layers = {name: errors(name, x) for name, x in inputs.items()}
    largest = max(inputs, key=lambda name: inputs[name].abs().max().item())
    injected = inputs[largest].clone()
    features = torch.randperm(injected.shape[1], generator=torch.Generator().manual_seed(0))[:3]
    injected[:, features] *= 60.0
    return dict(layers=layers, injected=dict(layer=largest, features=features.tolist(), **errors(largest, injected)))


# ----------------------------------------------------------------------------- int8 compute, one layer


@torch.no_grad()
def layer_speed(width: int, tokens: tuple[int, ...], rounds: int, calls: int = 20) -> dict:
    """One ``width x width`` linear layer, each contender ``calls`` times per round: fp32 / contender time ratios.

    Lesson 5's model is too narrow (192) for int8 compute to win: at batch 1 its matmuls take a few
    microseconds, less than quantizing the activations. At the width of a real model the int8
    GEMM (VNNI/AMX through ``torch._int_mm``) does the same work in a fraction of fp32's time.
    """
    import bitsandbytes as bnb

    linear = torch.nn.Linear(width, width, bias=False)
    bnb_layer = bnb.nn.Linear8bitLt(width, width, bias=False, has_fp16_weights=False, threshold=DEFAULT_THRESHOLD)
    bnb_layer.load_state_dict(linear.state_dict())
    layers = {"fp32": linear, "bf16": torch.nn.Linear(width, width, bias=False).to(torch.bfloat16),
              **{name: Int8Linear.from_linear(linear, scheme) for name, scheme in
                 (("hand int8 weight-only", "weight_only"), ("hand LLM.int8()", "llm_int8"), ("hand W8A8", "w8a8"))},
              "bitsandbytes int8": bnb_layer.to("cpu").eval()}
    result = {}
    for count in tokens:
        x = torch.randn(count, width)
        inputs = {name: x.to(torch.bfloat16) if name == "bf16" else x for name in layers}

        def repeat(name: str) -> None:
            for _ in range(calls):
                layers[name](inputs[name])

        timings = time_interleaved({name: (lambda name=name: repeat(name)) for name in layers}, rounds=rounds, warmup=2)
        result[count] = {name: asdict(timings.speedup(name, "fp32")) for name in layers}
    return result


# ----------------------------------------------------------------------------- llama.cpp


def llama_cpp_row(model, tokenizer, texts: list[str], prompt_texts: list[str], new_tokens: int, folder: Path) -> dict | str:
    """llama.cpp's Q8_0 through ``hf_models.conversion.gguf``, or why it could not run."""
    try:
        from hf_models.conversion.gguf import export_gguf, measure_llama_cpp

        path = export_gguf(model, tokenizer, folder / "model-q8_0.gguf", file_type="q8_0")
        return measure_llama_cpp(path, texts=texts, prompts=prompt_texts, max_new_tokens=new_tokens)
    except ImportError as error:
        return f"not installed (pip install llama-cpp-python): {error}"
    except ValueError as error:  # a tokenizer or model llama.cpp cannot take (e.g. a character tokenizer)
        return f"not exportable to llama.cpp: {error}"


# ----------------------------------------------------------------------------- the lesson

# %%
args, data_args = HfArgumentParser((QuantizationArguments, DataArguments)).parse_args_into_dataclasses(args=recipe_argv())
torch.set_num_threads(args.threads)
torch.set_grad_enabled(False)
check_counts(data_args)  # --max_eval_tokens
check_output_dir_writable(args.output_dir)
source = resolve_model_source(args.model, "--model", "recipes/05_modern_gpt.py", args.output_dir)
folder, output_dir = source.folder, Path(args.output_dir)

# %% [markdown]
# ## 1. Data: the held-out split of the corpus the model was trained on, and a fixed prompt set.

# %%
tokenizer = load_tokenizer_for(folder)  # refused if it is not the model's tokenizer
corpus = load_lesson_corpus(data_args)
split = "test" if "test" in corpus else "validation"
stream = split_token_ids(corpus[split], tokenizer)
byte_lengths = token_byte_lengths(tokenizer)
prompts = held_out_prompts(stream, args.prompts, args.prompt_tokens)  # (P, T)

# %% [markdown]
# ## 2. The variants, each loaded from the folder as a user would.

# %%
models = {name: AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval() for name, kwargs in VARIANTS.items()}
context = models["fp32"].config.max_position_embeddings
if args.prompt_tokens + args.new_tokens > context:
    sys.exit(f"--prompt_tokens + --new_tokens = {args.prompt_tokens + args.new_tokens} exceeds the model's context {context}.")

def expert_precision(models: dict[str, torch.nn.Module]) -> dict | None:
    """An MoE's expert weights, and their dtype in each variant (int8 and NF4 swap nn.Linear layers only); None for a dense model."""
    names = expert_weights(models["fp32"])
    if not names:
        return None
    dtypes = {variant: sorted({str(p.dtype).removeprefix("torch.") for n, p in model.named_parameters() if n in names})
              for variant, model in models.items()}
    count = sum(p.numel() for n, p in models["fp32"].named_parameters() if n in names)
    kinds = sorted({name.rsplit(".", 1)[-1] for name in names})
    by_dtype = {dtype: [v for v in dtypes if dtypes[v] == [dtype]] for dtype in sorted({d for ds in dtypes.values() for d in ds})}
    statement = (f"MoE model: its {len(names)} expert weights ({', '.join(kinds)}: 3-D, {count:,} parameters, "
                 f"{count / models['fp32'].num_parameters():.0%} of the model) are not nn.Linear layers, so bitsandbytes int8/NF4 "
                 f"and the hand int8 leave them unquantized, in full precision: "
                 + "; ".join(f"{dtype} in {', '.join(variants)}" for dtype, variants in by_dtype.items())
                 + ". 'linear MB' leaves them out; 'model MB' counts them.")
    return dict(weights=names, parameters=count, dtype_per_variant=dtypes, statement=statement)

experts = expert_precision(models)
if experts:
    print(experts["statement"])

# %% [markdown]
# ## 3. Quality: held-out perplexity and bits per byte, and greedy agreement with fp32.

# %%
rows = {}
reference = greedy(models["fp32"], prompts, args.new_tokens)
for name, model in models.items():
    metrics = evaluate_token_stream(model, stream, byte_lengths, context, max_tokens=data_args.max_eval_tokens)
    tokens = greedy(model, prompts, args.new_tokens)
    rows[name] = dict(linear_weight_bytes=linear_weight_bytes(model), model_bytes=model.get_memory_footprint(),
                      perplexity=metrics["perplexity"], bits_per_byte=metrics["bits_per_byte"], held_out=metrics,
                      greedy_agreement=(tokens == reference).float().mean().item())
    print(f"evaluated {name}: perplexity {metrics['perplexity']:.3f}")

# %% [markdown]
# ## 4. Speed: greedy generation at batch 1 and 8, every variant once per round, in rotating order.

# %%
machine = describe_machine()
timings = {}
for batch in (1, args.prompts):
    batch_prompts = prompts[:batch]
    timings[batch] = time_interleaved({name: (lambda m=model: greedy(m, batch_prompts, args.new_tokens)) for name, model in models.items()},
                                      rounds=args.rounds, warmup=1)
    for name in models:
        rows[name][f"tokens_per_second_batch{batch}"] = batch * args.new_tokens / timings[batch].median_seconds[name]
        rows[name][f"speed_vs_fp32_batch{batch}"] = asdict(timings[batch].speedup(name, "fp32"))

# %% [markdown]
# ## 5. llama.cpp Q8_0, if installed (not interleaved with the rest: its own process and clock).

# %%
texts = ["".join(corpus[split]["text"])]
llama = llama_cpp_row(models["fp32"], tokenizer, texts, tokenizer.batch_decode(prompts), args.new_tokens, output_dir)

# %% [markdown]
# ## 6. The table.

# %%
fp32 = rows["fp32"]
print(f"\nlesson 9 on {folder} ({models['fp32'].num_parameters():,} parameters), held-out split {split!r}, "
      f"{args.prompts} prompts x {args.new_tokens} greedy tokens; machine: {machine.summary()}")
print(f"{'variant':<24}{'linear MB':>10}{'x fp32':>8}{'model MB':>10}{'ppl':>9}{'d ppl':>8}{'bpb':>8}{'d bpb':>8}"
      f"{'speed b1':>18}{'speed b8':>18}{'agree':>7}")
for name, row in rows.items():
    print(f"{name:<24}{row['linear_weight_bytes'] / 1e6:>10.3f}{row['linear_weight_bytes'] / fp32['linear_weight_bytes']:>8.2f}"
          f"{row['model_bytes'] / 1e6:>10.3f}{row['perplexity']:>9.3f}{100 * (row['perplexity'] / fp32['perplexity'] - 1):>7.2f}%"
          f"{row['bits_per_byte']:>8.4f}{row['bits_per_byte'] - fp32['bits_per_byte']:>+8.4f}"
          f"{timings[1].speedup(name, 'fp32').band():>18}{timings[args.prompts].speedup(name, 'fp32').band():>18}"
          f"{row['greedy_agreement']:>7.1%}")
if isinstance(llama, dict):
    same = [list(ids)[-args.new_tokens:] == ref for ids, ref in zip(llama["greedy_ids"], reference.tolist())]
    llama["greedy_agreement_sequences"] = sum(same) / len(same)
    print(f"{'llama.cpp Q8_0':<24}{'':>18}{llama['file_mb']:>10.3f}{'':>17}{llama['bits_per_byte']:>8.4f}"
          f"{llama['bits_per_byte'] - fp32['bits_per_byte']:>+8.4f}{llama['tokens_per_second']:>12.1f} tok/s (own process, not interleaved)"
          f"   identical sequences {llama['greedy_agreement_sequences']:.0%}")
else:
    print(f"{'llama.cpp Q8_0':<24}{llama}")
print("speed: median of per-round time ratios fp32 / variant (> 1: faster than fp32), (q1-q3) the noise band.")

layer = layer_speed(args.layer_width, (1, 128), args.rounds)
print(f"\nint8 compute, one {args.layer_width} x {args.layer_width} linear layer: speed vs fp32 (> 1: faster), (q1-q3)")
print(f"  {'variant':<24}" + "".join(f"{f'{count} token(s)':>20}" for count in layer))
for name in layer[1]:
    print(f"  {name:<24}" + "".join(f"{PairedRatio(**layer[count][name]).band():>20}" for count in layer))

story = outlier_story(models["fp32"], prompts)
print(f"\noutliers in this model: linear inputs with |x| >= {DEFAULT_THRESHOLD} (relative output error from activation int8):")
print(f"  {'layer':<34}{'max |x|':>9}{'feats>=6':>10}{'absmax int8':>13}{'LLM.int8()':>12}")
top = sorted(story["layers"].items(), key=lambda item: -item[1]["max_abs_activation"])[:5]
for name, row in top:
    print(f"  {name:<34}{row['max_abs_activation']:>9.2f}{row['outlier_features']:>10}{row['absmax_int8']:>13.4f}{row['llm_int8']:>12.4f}")
injected = story["injected"]
print(f"  3 features x 60 injected into {injected['layer']}: absmax int8 error {injected['absmax_int8']:.4f}, "
      f"LLM.int8() {injected['llm_int8']:.4f} ({injected['outlier_features']} outlier features cut out)")

# %% [markdown]
# ## 7. Save the hand int8 model (it reloads quantized, also with trust_remote_code) with its card.

# %%
saved = models[{"weight_only": "hand int8 weight-only", "llm_int8": "hand LLM.int8()", "w8a8": "hand W8A8"}[args.saved_scheme]]
name = next(n for n, m in models.items() if m is saved)
card = build_model_card(
    model_name=args.model_name, lesson="9 (INT8 quantization by hand)", recipe="recipes/09_quantization.py",
    summary=f"The {source.description} with every linear layer but the tied LM head in int8 ({args.saved_scheme}: absmax, "
    f"symmetric, per output channel; hf_models/int8.py)"
    f"{'; the experts (3-D weights, not nn.Linear) stay in ' + experts['dtype_per_variant'][name][0] if experts else ''}. "
    f"Load: AutoModelForCausalLM.from_pretrained(folder) "
    f"(or trust_remote_code=True without hf_models).",
    dataset=data_args.dataset, tokenizer=f"{len(tokenizer)} tokens, the model's own",
    results={split: rows[name]["held_out"]},
    training={"quantization": f"{name}, post-training, no calibration data", "source model": str(folder),
              "perplexity vs fp32": f"{100 * (rows[name]['perplexity'] / fp32['perplexity'] - 1):+.2f}%",
              "linear weights vs fp32": f"{rows[name]['linear_weight_bytes'] / fp32['linear_weight_bytes']:.2f}x"},
    limitations="Post-training int8 of a 2M-parameter model trained for minutes; the activations of models this small "
    "have no LLM.int8()-style outlier features. Int8 weights are frozen (train adapters beside them).",
    tags=["int8", "quantization", "llm.int8"],
)
saved_tokenizer = tokenizer_for_saving(tokenizer, saved)  # context, padding, and the record in saved.config

def write(tmp: Path) -> None:
    saved.save_pretrained(tmp)
    saved_tokenizer.save_pretrained(tmp)
    card.save(tmp / "README.md")

int8_folder = save_folder_atomically(output_dir / args.model_name, write)
write_json_atomically(output_dir / "results.json", dict(
    arguments=asdict(args), data=asdict(data_args), model_folder=str(folder), model=source.description, split=split, machine=machine.to_dict(),
    results=rows, experts=experts, llama_cpp_q8_0=llama, outliers=story, single_layer_speed_vs_fp32=layer, int8_folder=str(int8_folder),
    timings={f"batch{batch}": t.to_dict() for batch, t in timings.items()},
))
print(f"\nint8 folder: {int8_folder}\nresults: {output_dir / 'results.json'}")
