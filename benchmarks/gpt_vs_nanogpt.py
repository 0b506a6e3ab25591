"""The zoo's GPT against karpathy/nanoGPT at nanoGPT's CPU configuration, side by side in one run.

nanoGPT's README trains a tiny character-level GPT on tiny-shakespeare on a CPU (4 layers, 4 heads,
width 128, context 64, batch 12, 2000 iterations, lr 1e-3 with cosine decay to 1e-4, dropout 0, no
biases) and reaches a validation loss of about 1.88. This script answers two questions:

1. Is an HF-native model as fast? ``step`` mode times ``--steps`` training steps (forward,
   backward, clipping, AdamW) of nanoGPT's ``GPT`` and of ``hf_models.GPTForCausalLM`` at that
   size with the shared timer (``hf_models.benchmarking.time_interleaved``: rounds of alternating
   order, so machine noise hits both alike) and prints the median tokens/s of each, and their
   ratio with its paired q1-q3 noise band.
2. Does the whole recipe match, end to end? ``train`` mode runs nanoGPT's own ``train.py`` and the
   zoo's ``recipes/04_gpt.py`` with the same settings one after the other, and compares their
   training-loop throughput and the final models' loss on the WHOLE validation split in
   non-overlapping 64-character windows (the zoo's ``evaluate_token_stream``; nanoGPT's own
   ``estimate_loss`` samples 20 random batches instead).

``--config gpu`` runs the second mode at nanoGPT's GPU configuration instead, read from nanoGPT's own
``config/train_shakespeare_char.py`` (6 layers, 6 heads, width 384, context 256, batch 64, dropout
0.2), on CUDA with ``torch.compile`` and bf16 autocast on both sides, for ``--max_iters`` iterations
(the GPU check, ``utils/gpu_check.py``, times a few hundred): it compares training throughput only,
since a few hundred iterations say nothing about the final loss.

nanoGPT is not part of this project: pass a checkout (or the bare git directory a mirror gives)
with ``--nanogpt_dir`` or the ``NANOGPT_DIR`` environment variable. Without either the script
exits as "skipped" (``make bench`` lists it and goes on). Its files are exported into a temporary
folder; nothing of it is kept. Measured numbers are in docs/nanogpt.md.

    python benchmarks/gpt_vs_nanogpt.py --nanogpt_dir /path/to/nanoGPT --mode step
    NANOGPT_DIR=/path/to/nanoGPT python benchmarks/gpt_vs_nanogpt.py --mode train
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser

from hf_models.benchmarking import prepare_benchmark, skip_benchmark, time_interleaved
from hf_models.files import write_json_atomically

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "tinyshakespeare" / "input.txt"
CPU_CONFIG = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup=100)
# Iterations left out of each side's throughput: the first ones (torch.compile compiles in the first), as the
# recipe's step clock (ThroughputCallback) leaves out its first steps.
SKIP_FIRST_ITERS = 5


@dataclass
class NanoGPTComparisonArguments:
    threads: int = field(default=0, metadata={"help": "CPU threads for both sides (0: every usable CPU)."})
    nanogpt_dir: str | None = field(
        default=os.environ.get("NANOGPT_DIR"),
        metadata={"help": "A karpathy/nanoGPT checkout or bare git directory (default: $NANOGPT_DIR)."},
    )
    data_file: str = field(default=str(DEFAULT_DATA), metadata={"help": "tiny-shakespeare input.txt."})
    mode: str = field(
        default="both",
        metadata={"help": "step: training steps of both models, interleaved; train: both training scripts end to end.",
                  "choices": ["step", "train", "both"]},
    )
    rounds: int = field(default=8, metadata={"help": "Timed interleaved rounds of the step benchmark."})
    steps: int = field(default=50, metadata={"help": "Training steps per model per round."})
    output: str = field(default=str(REPO / "benchmarks" / "results" / "gpt_vs_nanogpt.json"), metadata={"help": "JSON path."})
    config: str = field(
        default="cpu",
        metadata={"help": "cpu: nanoGPT's README CPU run, end to end; gpu: its config/train_shakespeare_char.py on CUDA, "
                          "compiled, throughput only (--mode train).", "choices": ["cpu", "gpu"]},
    )
    max_iters: int | None = field(default=None, metadata={"help": "Iterations of each training script (default: the config's)."})


def export_nanogpt(source: Path, into: Path) -> Path:
    """Copy nanoGPT's files into ``into`` (from a checkout, or from a bare git dir via ``git archive``)."""
    into.mkdir(parents=True, exist_ok=True)
    if (source / "model.py").exists():
        subprocess.run(["cp", "-r", f"{source}/.", str(into)], check=True)
    else:
        archive = subprocess.run(["git", f"--git-dir={source}", "archive", "HEAD"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def nanogpt_gpu_config(folder: Path, max_iters: int | None) -> dict:
    """nanoGPT's ``config/train_shakespeare_char.py`` (plain assignments), in this script's names."""
    values: dict = {}
    exec((folder / "config" / "train_shakespeare_char.py").read_text(), {}, values)
    iters = max_iters or values["max_iters"]
    return dict(n_layer=values["n_layer"], n_head=values["n_head"], n_embd=values["n_embd"], block_size=values["block_size"],
                batch_size=values["batch_size"], max_iters=iters, lr=values["learning_rate"], min_lr=values["min_lr"],
                warmup=values["warmup_iters"], dropout=values["dropout"], beta2=values["beta2"])


def import_nanogpt_model(folder: Path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def char_data(path: Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    text = path.read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], len(chars)


# --- 1. one training step, interleaved ------------------------------------------------------------


def step_benchmark(nanogpt, train_ids: torch.Tensor, vocab: int, rounds: int, steps: int) -> dict:
    from hf_models import GPTConfig, GPTForCausalLM

    c = CPU_CONFIG
    torch.manual_seed(0)
    theirs = nanogpt.GPT(nanogpt.GPTConfig(n_layer=c["n_layer"], n_head=c["n_head"], n_embd=c["n_embd"], block_size=c["block_size"], vocab_size=vocab, dropout=0.0, bias=False))
    ours = GPTForCausalLM(GPTConfig(vocab_size=vocab, max_position_embeddings=c["block_size"], hidden_size=c["n_embd"], num_hidden_layers=c["n_layer"], num_attention_heads=c["n_head"], bias=False, hidden_act="gelu"))
    ours.config._attn_implementation = "sdpa"

    def adamw(model):  # nanoGPT's groups: decay matrices and embeddings, not norms or biases
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1}, {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=c["lr"], betas=(0.9, 0.99))

    generator = torch.Generator().manual_seed(0)

    def batch():
        starts = torch.randint(len(train_ids) - c["block_size"] - 1, (c["batch_size"],), generator=generator)
        x = torch.stack([train_ids[s : s + c["block_size"]] for s in starts])
        y = torch.stack([train_ids[s + 1 : s + 1 + c["block_size"]] for s in starts])
        return x, y

    def train_steps(model, optimizer, loss_of) -> None:
        model.train()
        for _ in range(steps):
            x, y = batch()
            loss = loss_of(model, x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    runners = {
        "nanoGPT GPT": (theirs, adamw(theirs), lambda m, x, y: m(x, y)[1]),
        "hf_models GPTForCausalLM": (ours, adamw(ours), lambda m, x, y: m(input_ids=x, labels=x, shift_labels=y).loss),
    }
    timings = time_interleaved({name: (lambda runner=runner: train_steps(*runner)) for name, runner in runners.items()},
                               rounds=rounds, warmup=1)
    tokens = steps * c["batch_size"] * c["block_size"]
    ratio = timings.speedup("hf_models GPTForCausalLM", baseline="nanoGPT GPT")
    return {
        "tokens_per_second": {name: tokens / seconds for name, seconds in timings.median_seconds.items()},
        "ratio_hf_models_over_nanogpt": {"q1": ratio.q1, "median": ratio.median, "q3": ratio.q3},
        "timings": timings.to_dict(),
    }


# --- 2. the two training scripts end to end -------------------------------------------------------


def run_or_explain(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a training script; if it fails, stop with its command and the end of its stderr, not a bare CalledProcessError."""
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-4000:]}")
    return result


def nanogpt_command(c: dict, gpu: bool) -> list[str]:
    """nanoGPT's train.py on its shakespeare-char config, with ``c``'s sizes; on the GPU compiled (its default)."""
    eval_interval = c["max_iters"] if gpu else 250  # on the GPU: only at the start and the end, both left out of the timing
    device = ["--device=cuda", "--compile=True", f"--dropout={c['dropout']}"] if gpu else ["--device=cpu", "--compile=False", "--dropout=0.0"]
    return [
        sys.executable, "train.py", "config/train_shakespeare_char.py", *device, f"--eval_interval={eval_interval}",
        "--eval_iters=20", "--log_interval=1", f"--block_size={c['block_size']}", f"--batch_size={c['batch_size']}",
        f"--n_layer={c['n_layer']}", f"--n_head={c['n_head']}", f"--n_embd={c['n_embd']}", f"--max_iters={c['max_iters']}",
        f"--lr_decay_iters={c['max_iters']}", "--out_dir=out",
    ]


def run_nanogpt_training(folder: Path, data_file: Path, nanogpt, c: dict = CPU_CONFIG, gpu: bool = False) -> dict:
    data_dir = folder / "data" / "shakespeare_char"
    (data_dir / "input.txt").write_text(data_file.read_text())
    subprocess.run([sys.executable, "prepare.py"], cwd=data_dir, check=True, capture_output=True)
    command = nanogpt_command(c, gpu)
    eval_interval = int(next(a for a in command if a.startswith("--eval_interval=")).split("=")[1])
    log = run_or_explain(command, folder).stdout
    # Iteration times, leaving out the first iterations and those that paid for an evaluation.
    times = [float(t) for it, t in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", log)
             if int(it) > SKIP_FIRST_ITERS and int(it) % eval_interval != 0]
    tokens_per_second = c["batch_size"] * c["block_size"] / (statistics.mean(times) / 1000)
    if gpu:  # throughput only: a few hundred iterations say nothing about the final loss
        return {"train_tokens_per_second": tokens_per_second, "timed_iterations": len(times)}
    checkpoint = torch.load(folder / "out" / "ckpt.pt", map_location="cpu", weights_only=False)  # nanoGPT's own format
    model = nanogpt.GPT(nanogpt.GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in checkpoint["model"].items()})
    return {"train_tokens_per_second": tokens_per_second, "model": model, "checkpoint_iter": checkpoint["iter_num"]}


class LogitsOf(torch.nn.Module):
    """Gives nanoGPT's model the ``model(input_ids=...).logits`` interface our evaluator uses."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, use_cache=False):
        logits, _ = self.model(input_ids, input_ids)  # with targets, nanoGPT returns logits at every position
        return type("Output", (), {"logits": logits})


def zoo_command(data_file: Path, output_dir: Path, c: dict = CPU_CONFIG, gpu: bool = False) -> list[str]:
    """recipes/04_gpt.py at ``c``'s sizes; on the GPU with what nanoGPT's train.py does there: bf16 autocast,
    torch.compile, TF32 matmuls, fused AdamW, its dropout and beta2, and no evaluation until the end."""
    gpu_flags = ["--bf16", "true", "--torch_compile", "true", "--tf32", "true", "--optim", "adamw_torch_fused",
                 "--dropout", str(c["dropout"]), "--adam_beta2", str(c["beta2"]), "--eval_steps", str(c["max_iters"]),
                 "--max_eval_tokens", str(16 * c["block_size"] * c["batch_size"]), "--sample_tokens", "16"] if gpu else []
    return [
        sys.executable, str(REPO / "recipes" / "04_gpt.py"), "--dataset", "text", "--data_files", str(data_file),
        "--num_hidden_layers", str(c["n_layer"]), "--num_attention_heads", str(c["n_head"]), "--hidden_size", str(c["n_embd"]),
        "--block_size", str(c["block_size"]), "--per_device_train_batch_size", str(c["batch_size"]),
        "--max_steps", str(c["max_iters"]), "--learning_rate", str(c["lr"]), "--warmup_steps", str(c["warmup"]),
        "--eval_steps", "250", "--output_dir", str(output_dir), "--card_copy", "", "--disable_tqdm", "true", *gpu_flags,
    ]


def run_zoo_training(data_file: Path, output_dir: Path, c: dict = CPU_CONFIG, gpu: bool = False) -> dict:
    run_or_explain(zoo_command(data_file, output_dir, c, gpu), REPO)
    return json.loads((output_dir / "results.json").read_text())


def main() -> None:
    (args,) = HfArgumentParser(NanoGPTComparisonArguments).parse_args_into_dataclasses()
    if not args.nanogpt_dir:
        skip_benchmark("gpt_vs_nanogpt.py needs a karpathy/nanoGPT checkout: pass --nanogpt_dir or set NANOGPT_DIR")
    data_file = Path(args.data_file)
    if not data_file.exists():
        skip_benchmark(f"gpt_vs_nanogpt.py needs tiny-shakespeare's input.txt at {data_file} (--data_file)")
    # Passive OpenMP waits and pinned threads for both sides; nanoGPT's train.py inherits the environment.
    machine = prepare_benchmark(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the train.py processes: the same count

    from hf_models.evaluation import evaluate_token_stream

    train_ids, val_ids, vocab = char_data(data_file)
    report: dict = {"benchmark": "gpt_vs_nanogpt", "config": CPU_CONFIG, "machine": machine.to_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_nanogpt(Path(args.nanogpt_dir), Path(tmp) / "nanogpt")
        nanogpt = import_nanogpt_model(folder)
        if args.config == "gpu":
            report["config"] = c = nanogpt_gpu_config(folder, args.max_iters)
            theirs = run_nanogpt_training(folder, data_file, nanogpt, c, gpu=True)
            ours = run_zoo_training(data_file, Path(tmp) / "zoo", c, gpu=True)
            ratio = ours["train_tokens_per_second"] / theirs["train_tokens_per_second"]
            report["train"] = {
                "nanoGPT train.py": theirs,
                "hf_models recipes/04_gpt.py": {"train_tokens_per_second": ours["train_tokens_per_second"]},
                "throughput_ratio": ratio,
            }
            print(f"\nnanoGPT's shakespeare-char GPU config on {machine.summary()}, both compiled, {c['max_iters']} iterations:")
            print(f"  nanoGPT train.py              {theirs['train_tokens_per_second']:12,.0f} tokens/s")
            print(f"  hf_models recipes/04_gpt.py   {ours['train_tokens_per_second']:12,.0f} tokens/s")
            print(f"  throughput ratio hf_models / nanoGPT: {ratio:.3f}")
            write_json_atomically(args.output, report)
            print(f"\nsaved {args.output}")
            return
        if args.mode in ("step", "both"):
            report["step"] = step = step_benchmark(nanogpt, train_ids, vocab, args.rounds, args.steps)
            print(f"\nTraining step (forward + backward + clip + AdamW), median tokens/s, {args.rounds} interleaved rounds:")
            for name, value in step["tokens_per_second"].items():
                print(f"  {name:28s} {value:10,.0f}")
            ratio = step["ratio_hf_models_over_nanogpt"]
            print(f"  ratio hf_models / nanoGPT      {ratio['median']:10.3f}  (paired q1-q3 {ratio['q1']:.3f}-{ratio['q3']:.3f})")
        if args.mode in ("train", "both"):
            theirs = run_nanogpt_training(folder, data_file, nanogpt)
            bytes_per_char = torch.ones(vocab, dtype=torch.long)  # tiny-shakespeare is ASCII
            their_eval = evaluate_token_stream(LogitsOf(theirs.pop("model")), val_ids, bytes_per_char, CPU_CONFIG["block_size"])
            ours = run_zoo_training(data_file, Path(tmp) / "zoo")
            report["train"] = {
                "nanoGPT train.py": {"train_tokens_per_second": theirs["train_tokens_per_second"], "validation_loss": their_eval["loss"], "checkpoint_iter": theirs["checkpoint_iter"]},
                "hf_models recipes/04_gpt.py": {"train_tokens_per_second": ours["train_tokens_per_second"], "validation_loss": ours["validation"]["loss"]},
            }
            print("\nEnd to end, 2000 iterations, whole validation split in non-overlapping 64-char windows:")
            for name, r in report["train"].items():
                print(f"  {name:28s} {r['train_tokens_per_second']:10,.0f} tokens/s   val loss {r['validation_loss']:.4f}")
            ratio = ours["train_tokens_per_second"] / theirs["train_tokens_per_second"]
            report["train"]["throughput_ratio"] = ratio
            print(f"  throughput ratio hf_models / nanoGPT: {ratio:.3f}")
    write_json_atomically(args.output, report)
    print(f"\nsaved {args.output}")


if __name__ == "__main__":
    main()
