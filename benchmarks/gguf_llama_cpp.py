"""The zoo's decoding against llama.cpp and transformers, on one model and its GGUF export.

Greedy decoding at batch 1 of the same prompt ids, with the same thread count, by six contenders:

* the zoo model eager (``generate()``'s default: lesson 6's ``GrowingKVCache``);
* the zoo model compiled (``cache_implementation="static"`` with a ``compile_config``: lesson 6's
  ``StaticKVCache`` and one compiled decoding step, ``hf_models.benchmarking.generation.compile_config``);
* its transformers twin, eager and compiled the same way (``LlamaForCausalLM`` for lesson 5's
  modern decoder, ``MixtralForCausalLM`` for an MoE decoder: same weights, through the converter);
* llama.cpp (llama-cpp-python) on the zoo's own GGUF export, f32 and Q8_0.

They are timed by ``hf_models.benchmarking.time_interleaved``: interleaved rounds, each round one
call per contender (all prompts), medians, and per-round paired ratios with their q1-q3 band.

Each llama.cpp file decodes in its own child process, which stays alive across rounds and answers
one request per round: a crash inside llama.cpp (llama-cpp-python 0.3.36 segfaults on Q8_0 files on
some CPUs) ends that child, and the row reports it, not the run. Before timing, each child also
reports whether llama.cpp tokenizes the prompts to the same ids and how far its logits of one text
are from the zoo's. Without llama-cpp-python the four torch rows are still measured and the llama.cpp
rows say how to install it.

    python benchmarks/gguf_llama_cpp.py                                   # lesson 5's model, 1 thread
    python benchmarks/gguf_llama_cpp.py --threads 2
    python benchmarks/gguf_llama_cpp.py --model runs/10_moe/<folder>      # an MoE decoder folder

Targets (issue 19): the compiled zoo >= 0.5x llama.cpp f32; the zoo >= 1.0x its transformers twin,
eager and compiled alike.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

import hf_models  # noqa: F401  (registers the zoo's model types)
from hf_models.benchmarking import prepare_benchmark, skip_benchmark, time_interleaved
from hf_models.benchmarking.generation import compile_config
from hf_models.conversion import modern_to_llama, moe_to_mixtral
from hf_models.conversion.gguf import export_gguf, llama_cpp_greedy
from hf_models.files import write_json_atomically

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["ROMEO:\nBut soft, what light", "MACBETH:\nIs this a dagger", "First Citizen:\nBefore we proceed", "JULIET:\nO Romeo"]
TEXT = "MACBETH:\nIs this a dagger which I see before me,\nThe handle toward my hand? Come, let me clutch thee.\n"
LLAMA_CPP_FILES = ("f32", "q8_0")
INSTALL_HINT = ("pip install llama-cpp-python (it compiles llama.cpp: about 30 minutes on 2 cores; "
                "CMAKE_ARGS='-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF' shortens it)")


@dataclass
class GGUFBenchmarkArguments:
    model: str = field(
        default="runs/05_modern_gpt/modern-gpt-shakespeare",
        metadata={"help": "A saved zoo modern or MoE decoder folder, with its BPE tokenizer (lesson 5's by default)."},
    )
    new_tokens: int = field(default=64, metadata={"help": "Greedy tokens generated per prompt, by every contender."})
    threads: int = field(default=1, metadata={"help": "CPU threads, for torch and for llama.cpp alike (0: every usable CPU)."})
    rounds: int = field(default=8, metadata={"help": "Timed rounds; each runs every contender once on all prompts."})
    output_dir: str = field(default=str(REPO / "benchmarks" / "results"), metadata={"help": "Where gguf_llama_cpp.json goes."})


# ----------------------------------------------------------------------------- llama.cpp, in a child process


def llama_cpp_worker(connection, gguf_path: str, threads: int, prompt_ids: list[list[int]], new_tokens: int) -> None:
    """Serve one GGUF file: first a check, then one greedy decoding of every prompt per request.

    Runs in a child process. Sends ``{"same_ids": ..., "text_logits": ...}`` first (llama.cpp's own
    tokenization of the prompts and of ``TEXT``, and its logits of ``TEXT``), then answers each
    ``"decode"`` with the generated ids per prompt; ``None`` ends it.
    """
    from llama_cpp import Llama

    checker = Llama(model_path=gguf_path, n_ctx=0, logits_all=True, verbose=False, n_threads=threads)
    tokenized = [checker.tokenize(text.encode(), add_bos=False, special=False) for text in PROMPTS + [TEXT]]
    checker.eval(tokenized[-1])
    connection.send(dict(tokenized=tokenized, text_logits=np.asarray(checker.scores[: len(tokenized[-1])], dtype=np.float32)))
    del checker
    # The timed instance keeps only the last position's logits, as a decoding loop needs.
    llm = Llama(model_path=gguf_path, n_ctx=0, verbose=False, n_threads=threads, n_threads_batch=threads)
    while connection.recv() is not None:
        # Greedy; EOS does not stop it, as on the torch side.
        connection.send([llama_cpp_greedy(llm, ids, new_tokens, stop_at_eos=False) for ids in prompt_ids])


class LlamaCppChild:
    """A llama.cpp decoder in a child process; ``crash`` says how it died, if it did.

    ``worker`` is :func:`llama_cpp_worker` (a test passes one that crashes).
    """

    def __init__(self, gguf_path: Path, threads: int, prompt_ids: list[list[int]], new_tokens: int, worker=llama_cpp_worker) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch threads inherited
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=worker, args=(child_end, str(gguf_path), threads, prompt_ids, new_tokens), daemon=True)
        self.process.start()
        child_end.close()
        self.crash: str | None = None
        self.check = self._receive()

    def _receive(self):
        try:
            return self.connection.recv()
        except EOFError:  # the child died before answering
            self.process.join(timeout=10)
            code = self.process.exitcode
            self.crash = f"llama.cpp crashed (signal {-code})" if code is not None and code < 0 else f"llama.cpp exited ({code})"
            return None

    def decode(self) -> list[list[int]] | None:
        """One greedy decoding of every prompt; ``None`` once the child has crashed (the time is then meaningless)."""
        if self.crash:
            return None
        self.connection.send("decode")
        return self._receive()

    def close(self) -> None:
        if not self.crash:
            self.connection.send(None)
        self.process.join(timeout=10)


# ----------------------------------------------------------------------------- torch, in this process


def transformers_twin(model):
    """The transformers class computing the same function: Llama for the modern decoder, Mixtral for MoE."""
    return (moe_to_mixtral if model.config.model_type == "zoo_moe" else modern_to_llama)(model).eval()


def torch_decoder(model, prompt_ids: list[list[int]], new_tokens: int, compiled: bool):
    """A callable decoding every prompt greedily with ``model.generate`` (eager, or compiled as transformers does)."""
    settings = dict(max_new_tokens=new_tokens, do_sample=False)
    if compiled:
        settings.update(cache_implementation="static", compile_config=compile_config(model.device))
    prompts = [torch.tensor([ids]) for ids in prompt_ids]

    def decode() -> list[list[int]]:
        with torch.inference_mode():
            return [model.generate(ids, **settings)[0, ids.shape[1]:].tolist() for ids in prompts]

    return decode


def main() -> None:
    parser = HfArgumentParser(GGUFBenchmarkArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses()
    if args.new_tokens < 1 or args.rounds < 1:
        parser.error(f"--new_tokens and --rounds must be at least 1, got {args.new_tokens} and {args.rounds}.")
    if not Path(args.model, "config.json").exists():
        skip_benchmark(f"no model at {args.model} (run python recipes/05_modern_gpt.py first, or pass --model)")
    machine = prepare_benchmark(args.threads)  # passive OpenMP waits, pinned threads, the machine printed
    threads = torch.get_num_threads()  # llama.cpp gets the same count
    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None

    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    twin = transformers_twin(model)
    twin_name = type(twin).__name__
    for each in (model, twin):  # decode exactly new_tokens, never stopped by an EOS
        each.generation_config.eos_token_id = each.generation_config.pad_token_id = None
    # One prompt length for all: a static cache is sized prompt + new tokens, so a compiled step has one shape.
    encoded = [tokenizer(prompt).input_ids for prompt in PROMPTS]
    length = min(map(len, encoded))
    prompt_ids = [ids[:length] for ids in encoded]
    print(f"{args.model}: {len(PROMPTS)} prompts of {length} tokens, {args.new_tokens} greedy tokens each, batch 1, "
          f"{threads} thread(s), {args.rounds} interleaved rounds")

    contenders = {
        "zoo eager": torch_decoder(model, prompt_ids, args.new_tokens, compiled=False),
        "zoo compiled": torch_decoder(model, prompt_ids, args.new_tokens, compiled=True),
        f"{twin_name} eager": torch_decoder(twin, prompt_ids, args.new_tokens, compiled=False),
        f"{twin_name} compiled": torch_decoder(twin, prompt_ids, args.new_tokens, compiled=True),
    }
    status = {name: "" for name in contenders}  # why a row was not measured, if it was not
    checks: dict[str, dict] = {}
    children: dict[str, LlamaCppChild] = {}
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        text_ids = tokenizer(TEXT).input_ids
        zoo_logits = model(input_ids=torch.tensor([text_ids])).logits[0].float().numpy()  # (T, V)
        for file_type in LLAMA_CPP_FILES:
            name = f"llama.cpp {file_type}"
            status[name] = ""
            if not has_llama_cpp:
                status[name] = f"not installed: {INSTALL_HINT}"
                continue
            path = export_gguf(model, tokenizer, Path(folder) / f"model-{file_type}.gguf", file_type=file_type)
            child = children[name] = LlamaCppChild(path, threads, prompt_ids, args.new_tokens)
            if child.crash:
                status[name] = child.crash
                continue
            checks[name] = dict(
                file_mb=path.stat().st_size / 2**20,
                same_ids=child.check["tokenized"] == encoded + [text_ids],
                max_abs_logit_difference=float(np.abs(child.check["text_logits"] - zoo_logits).max()),
            )
            contenders[name] = child.decode

        outputs = {name: [] for name in contenders}
        timings = time_interleaved({name: (lambda name=name, decode=decode: outputs[name].append(decode())) for name, decode in contenders.items()},
                                   rounds=args.rounds, warmup=1)  # the warm-up call compiles the compiled contenders' step
    for name, child in children.items():
        if child.crash and not status[name]:
            status[name] = f"{child.crash} while timing"
        child.close()

    measured = [name for name in contenders if not status[name]]
    baseline = "llama.cpp f32" if "llama.cpp f32" in measured else None
    reference = outputs["zoo eager"][0]
    tokens_per_call = len(prompt_ids) * args.new_tokens
    rows = {}
    for name in measured:
        agree = sum(a == b for out, expected in zip(outputs[name][0], reference) for a, b in zip(out, expected))
        mode = name.split()[-1]
        rows[name] = dict(
            tokens_per_second=tokens_per_call / timings.median_seconds[name],
            greedy_tokens_equal=f"{agree}/{tokens_per_call}",
            vs_llama_cpp_f32=asdict(timings.speedup(name, baseline)) if baseline else None,
            vs_twin_same_mode=asdict(timings.speedup(name, f"{twin_name} {mode}")) if name.startswith("zoo ") else None,
            **checks.get(name, {}),
        )

    def band(ratio: dict | None) -> str:
        return f"{ratio['median']:.2f} ({ratio['q1']:.2f}-{ratio['q3']:.2f})" if ratio else "—"

    print(f"\n| decoder | tokens/s | vs llama.cpp f32 (q1-q3) | vs {twin_name}, same mode (q1-q3) | greedy tokens = zoo eager | notes |")
    print("|---|---:|---:|---:|---:|---|")
    for name in status:
        if status[name]:
            print(f"| {name} | — | — | — | — | {status[name]} |")
            continue
        row = rows[name]
        notes = ""
        if name in checks:
            notes = (f"{row['file_mb']:.2f} MB; tokenizer ids {'identical' if row['same_ids'] else 'DIFFER'}; "
                     f"max abs logit difference {row['max_abs_logit_difference']:.1e}")
        print(f"| {name} | {row['tokens_per_second']:,.0f} | {band(row['vs_llama_cpp_f32'])} | {band(row['vs_twin_same_mode'])} "
              f"| {row['greedy_tokens_equal']} | {notes} |")

    targets = [(f"zoo eager vs {twin_name} eager", "zoo eager", f"{twin_name} eager", 1.0),
               (f"zoo compiled vs {twin_name} compiled", "zoo compiled", f"{twin_name} compiled", 1.0)]
    if baseline:
        targets.insert(0, ("zoo compiled vs llama.cpp f32", "zoo compiled", baseline, 0.5))
    print("\ntargets (median of per-round ratios; a miss whose q3 reaches the target is within noise):")
    verdicts = []
    for what, contender, base, target in targets:
        ratio = timings.speedup(contender, base)
        verdict = "met" if ratio.median >= target else "within noise" if ratio.q3 >= target else "MISSED"
        verdicts.append(dict(what=what, target=target, ratio=asdict(ratio), verdict=verdict))
        print(f"  {what:<40} {ratio.band():<20} target >= {target}x: {verdict}")
    if not baseline:
        print(f"  zoo compiled vs llama.cpp f32: not measured ({status['llama.cpp f32']})")

    output = Path(args.output_dir) / "gguf_llama_cpp.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(output, dict(arguments=asdict(args), machine=machine.to_dict(), prompt_tokens=length, rows=rows,
                                       not_measured=status, targets=verdicts, timings=timings.to_dict()))
    print(f"\nresults: {output}")


if __name__ == "__main__":
    main()
