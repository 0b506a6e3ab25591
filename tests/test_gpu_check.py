"""The GPU check (``utils/gpu_check.py``) as far as a CPU takes it: the carry folder it builds, the refusals
before any work, the plan's command lines, and the runner's time limits and report.

No GPU and no package index are needed: the wheels are small real wheels built here (a wheel is a zip
with a METADATA file), fetched by the real ``pip download`` from a local folder, and nanoGPT's files
come from a small git repository made here. The steps the runner runs are real processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "utils"))
import gpu_check  # noqa: E402
from tests.test_recipes import RECIPES as TESTED_RECIPES, TINY_TRAINING as TESTED_TINY_TRAINING  # noqa: E402

SCRIPT = [sys.executable, str(REPO / "utils" / "gpu_check.py")]


def make_wheel(folder: Path, name: str, version: str, tag: str = "py3-none-any", requires: tuple[str, ...] = (),
               files: dict[str, bytes] | None = None) -> Path:
    """A minimal installable wheel: METADATA, WHEEL, RECORD and ``files``."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    contents = {f"{name.replace('-', '_')}/__init__.py": b"", **(files or {})}
    contents[f"{dist}.dist-info/METADATA"] = "\n".join(
        ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *[f"Requires-Dist: {r}" for r in requires]]).encode() + b"\n"
    contents[f"{dist}.dist-info/WHEEL"] = f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n".encode()
    record = "".join(f"{n},,\n" for n in contents) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for n, data in contents.items():
            archive.writestr(n, data)
        archive.writestr(f"{dist}.dist-info/RECORD", record)
    return path


@pytest.fixture
def checkout(tmp_path) -> dict:
    """A git checkout that ignores .gpu_carry/, a folder of wheels for every carried package, and a nanoGPT repository."""
    repo = tmp_path / "checkout"
    repo.mkdir()
    (repo / ".gitignore").write_text("/.gpu_carry/\n")
    (repo / "tracked.txt").write_text("x" * 1000)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    wheels = tmp_path / "index"
    wheels.mkdir()
    locked = gpu_check.locked_versions()
    for name in gpu_check.CARRIED:
        version = locked[gpu_check.normalize(name)]
        files = None
        if name == "bitsandbytes":  # one library per toolkit, as the real wheel has
            files = {f"bitsandbytes/libbitsandbytes_{lib}.so": b"\0" * 50_000 for lib in ("cpu", "cuda118", "cuda128", "cuda130", "rocm72")}
        make_wheel(wheels, name, version, files=files)
    nanogpt = tmp_path / "nanogpt"
    for file in gpu_check.NANOGPT_FILES:
        (nanogpt / file).parent.mkdir(parents=True, exist_ok=True)
        (nanogpt / file).write_text(f"# {file}\n")
    git = ["git", "-C", str(nanogpt), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(nanogpt)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "nanoGPT"], check=True)
    data = tmp_path / "input.txt"
    data.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50)
    return dict(repo=repo, wheels=wheels, nanogpt=nanogpt, data=data)


def prepare(checkout: dict, *extra: str) -> subprocess.CompletedProcess:
    command = [*SCRIPT, "prepare", "--carry_dir", str(checkout["repo"] / ".gpu_carry"), "--nanogpt_dir", str(checkout["nanogpt"]),
               "--data_file", str(checkout["data"]), "--wheel_source", str(checkout["wheels"]), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_prepare_builds_the_carry_folder_with_its_manifest(checkout):
    result = prepare(checkout)
    assert result.returncode == 0, result.stderr
    carry = checkout["repo"] / ".gpu_carry"
    manifest = json.loads((carry / "manifest.json").read_text())
    assert {e["name"] for e in manifest["wheels"]} == {gpu_check.normalize(n) for n in gpu_check.CARRIED}
    for entry in manifest["wheels"]:
        assert (carry / entry["file"]).stat().st_size == entry["bytes"] and gpu_check.sha256(carry / entry["file"]) == entry["sha256"]
    # bitsandbytes keeps the CPU library and CUDA 13's, and its RECORD no longer lists the others.
    bnb = next(e for e in manifest["wheels"] if e["name"] == "bitsandbytes")
    assert bnb["slimmed"]["kept_libraries"] == ["libbitsandbytes_cuda130.so"] and bnb["slimmed"]["dropped_libraries"] == 3
    with zipfile.ZipFile(carry / bnb["file"]) as archive:
        names = " ".join(archive.namelist())
        record = archive.read(next(n for n in archive.namelist() if n.endswith("RECORD"))).decode()
        assert "cuda118" not in names + record and "rocm" not in names + record
        assert "cuda130" in names and "cuda130" in record and "libbitsandbytes_cpu.so" in names
    # nanoGPT's files exported from git, not copied into the repository; the data beside them.
    assert sorted(manifest["nanogpt"]["files"]) == sorted(gpu_check.NANOGPT_FILES) and len(manifest["nanogpt"]["commit"]) == 40
    assert (carry / "nanogpt" / "train.py").read_text() == "# train.py\n" and (carry / "input.txt").read_text() == checkout["data"].read_text()
    assert manifest["carry_bytes"] == sum(p.stat().st_size for p in carry.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert manifest["working_tree_bytes"] >= 1000 and "MiB of the 64 MiB a call carries" in result.stdout
    assert subprocess.run(["git", "-C", str(checkout["repo"]), "status", "--porcelain"], capture_output=True, text=True).stdout.split() == [
        "??", ".gitignore", "??", "tracked.txt"]  # nothing of the carry folder shows up to be committed


def test_prepare_refuses_a_folder_over_the_call_limit_and_one_git_would_commit(checkout):
    unlocked = prepare(checkout, "--add", "nope-not-locked")
    assert unlocked.returncode != 0 and "--add ['nope-not-locked']: not in requirements/constraints.txt" in unlocked.stderr
    (checkout["data"].parent / "huge.txt").write_bytes(b"x" * (2 * gpu_check.MIB))
    over = prepare(checkout, "--limit_mib", "1", "--data_file", str(checkout["data"].parent / "huge.txt"))
    assert over.returncode != 0 and "over --limit_mib 1 (largest: input.txt 2.0 MiB" in over.stderr
    committed = subprocess.run([*SCRIPT, "prepare", "--carry_dir", str(checkout["repo"] / "carry"), "--nanogpt_dir", str(checkout["nanogpt"])],
                               capture_output=True, text=True, timeout=60)
    assert committed.returncode != 0 and "git does not ignore it" in committed.stderr


def test_setup_refuses_wheels_for_another_python_and_names_unmet_requirements(checkout, tmp_path):
    assert prepare(checkout).returncode == 0
    carry = checkout["repo"] / ".gpu_carry"
    manifest = json.loads((carry / "manifest.json").read_text())
    gpu_check.check_wheels_fit(carry, manifest)  # pure-Python wheels fit any Python 3

    other = make_wheel(carry / "wheels", "multiprocess", "0.70.19", tag="cp399-cp399-manylinux_2_17_x86_64")
    manifest["wheels"].append({"file": f"wheels/{other.name}", "name": "multiprocess", "version": "0.70.19", "sha256": gpu_check.sha256(other)})
    (carry / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([*SCRIPT, "setup", "--carry_dir", str(carry), "--work_dir", str(tmp_path / "work")], capture_output=True, text=True, timeout=60)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert result.returncode != 0 and f"this machine runs Python {here}" in result.stderr and other.name in result.stderr
    assert f"prepare --python_version {here}" in result.stderr and not (tmp_path / "work" / "site").exists()  # refused before installing

    needy = make_wheel(tmp_path, "needy", "1.0", requires=("numpy>=999", "pytest>=1", "nonexistent-package", "torch>=1; extra == 'gpu'"))
    problems = gpu_check.unmet_requirements(tmp_path, {"wheels": [{"file": needy.name, "name": "needy", "version": "1.0"}]}, sys.path)
    assert len(problems) == 2 and problems[0].startswith("needy 1.0 needs numpy>=999: this machine has ") and "nonexistent-package" in problems[1]


def test_dry_run_prints_every_step_and_the_budget_and_writes_nothing(tmp_path):
    work = tmp_path / "work"
    result = subprocess.run([*SCRIPT, "run", "--carry_dir", ".gpu_carry", "--dry-run", "--work_dir", str(work)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    steps = gpu_check.plan(work, tmp_path / "out", REPO / ".gpu_carry")
    for stage in gpu_check.STAGES:
        assert f"[{stage.name}]" in result.stdout
    for step in steps:
        assert step.name in result.stdout and f"{step.limit_s} s" in result.stdout
    budget = sum(gpu_check.critical_path(steps, stage.name) for stage in gpu_check.STAGES)
    assert f"planned at most {budget} s of the {budget} s budget" in result.stdout
    assert not work.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["run", "--carry_dir", "c", "--budget_s", "0", "--dry-run"], "--budget_s 0: allowed: a whole number above 0"),
        (["run", "--carry_dir", "c", "--steps", "gpu_tests,warp_drive", "--dry-run"], "--steps warp_drive: no such step or stage; allowed: "),
        (["run", "--carry_dir", "c", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (["run", "--carry_dir", "c", "--output_dir", str(REPO / "results")], "inside the repository"),
        (["run", "--carry_dir", "/nowhere", "--output_dir", "/tmp/gpu_check_test_out"], "--carry_dir /nowhere: no manifest.json"),
        (["prepare", "--carry_dir", "c", "--python_version", "12"], "--python_version 12: allowed: a CPython version such as 3.12"),
        (["prepare", "--carry_dir", "/tmp/elsewhere", "--nanogpt_dir", "x"], "must be a folder inside a git checkout"),
    ],
)
def test_bad_flags_are_refused_by_name_before_any_work(flags, message, tmp_path):
    result = subprocess.run([*SCRIPT, *flags], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_plan_commands_run_the_recipes_the_suite_runs_and_chain_their_models(tmp_path):
    """The tiny flags are the recipe tests' own; lessons 6, 8, 9 and 11 read the folders their needs write;
    every script named exists and accepts every flag the plan passes it."""
    assert gpu_check.TINY_TRAINING == TESTED_TINY_TRAINING
    for name, flags in TESTED_RECIPES.items():
        assert gpu_check.TINY_RECIPES[name] == flags, name
    steps = {s.name: s for s in gpu_check.plan(tmp_path, tmp_path / "out", tmp_path / "carry")}
    for step in steps.values():
        assert Path(step.command[1]).exists() or step.command[1] == "-m", step.command
        for need in step.needs:
            assert need in steps and str(tmp_path / need / "tiny") in " ".join(step.command)
    recipes = {Path(s.command[1]).stem for s in steps.values() if "/recipes/" in s.command[1]}
    assert recipes == {p.stem for p in (REPO / "recipes").glob("[0-9][0-9]_*.py")}  # every recipe
    for precision in gpu_check.PRECISIONS:
        assert all(f"--{precision}" in steps[f"{name}-{precision}"].command for name in gpu_check.TINY_RECIPES)


def test_benchmark_steps_parse_with_the_benchmarks_own_arguments(tmp_path):
    """The KV-cache and nanoGPT steps' command lines, parsed by the scripts' own HfArgumentParser dataclasses."""
    import importlib.util

    from transformers import HfArgumentParser

    steps = {s.name: s for s in gpu_check.plan(tmp_path, tmp_path / "out", tmp_path / "carry")}
    expected = {"kv_cache_benchmark": ("KVCacheBenchmarkArguments", dict(device="cuda", output_dir=str(tmp_path / "out"))),
                "nanogpt": ("NanoGPTComparisonArguments", dict(config="gpu", mode="train", max_iters=gpu_check.NANOGPT_ITERS))}
    for name, (arguments, values) in expected.items():
        script = Path(steps[name].command[1])
        spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
        spec.loader.exec_module(module)
        (parsed,) = HfArgumentParser(getattr(module, arguments)).parse_args_into_dataclasses(args=steps[name].command[2:])
        assert {key: getattr(parsed, key) for key in values} == values


def test_runner_stops_a_hung_step_reports_a_failure_and_runs_the_rest(tmp_path):
    """Real processes: one passes, one fails, one hangs past its limit, one needs the failed one."""
    python = sys.executable
    steps = [
        gpu_check.Step("fine", "functional", "passes", [python, "-c", "print('3 passed in 0.1s')"], 20),
        gpu_check.Step("broken", "functional", "fails", [python, "-c", "raise SystemExit('broken on purpose')"], 20),
        gpu_check.Step("hung", "functional", "hangs", [python, "-c", "import time; time.sleep(60)"], 1),
        gpu_check.Step("after_broken", "functional", "needs broken", [python, "-c", "pass"], 20, needs=["broken"]),
        gpu_check.Step("timing", "nanogpt", "runs after", [python, "-c", "pass"], 20),
    ]
    out = tmp_path / "out"
    started = time.monotonic()
    outcomes = gpu_check.run_steps(steps, {"PATH": "/usr/bin:/bin"}, tmp_path / "work", out, 100, {"gpu": "test GPU"}, time.monotonic() + 100)
    assert time.monotonic() - started < 15
    status = {o.name: o.status for o in outcomes}
    assert status == {"fine": "passed", "broken": "failed", "hung": "timed out", "after_broken": "not run", "timing": "passed"}
    results = json.loads((out / "results.json").read_text())
    assert results["machine"]["gpu"] == "test GPU" and set(results["failed"]) == {"broken", "hung", "after_broken"}
    table = (out / "table.md").read_text()
    assert "GPU check on test GPU" in table and "| broken | failed |" in table and "broken on purpose" in table
    assert "| fine | passed |" in table and "3 passed in 0.1s" in table and "stopped at 1 s" in table
    assert "broken on purpose" in (out / "steps.log").read_text()


def test_runner_stops_when_the_budget_runs_out(tmp_path):
    steps = [gpu_check.Step("slow", "functional", "", [sys.executable, "-c", "import time; time.sleep(60)"], 50),
             gpu_check.Step("next", "kv_cache", "", [sys.executable, "-c", "pass"], 50)]
    started = time.monotonic()
    outcomes = gpu_check.run_steps(steps, {"PATH": "/usr/bin:/bin"}, tmp_path / "work", tmp_path / "out", 2, {}, time.monotonic() + 2)
    assert time.monotonic() - started < 15 and [o.status for o in outcomes] == ["timed out", "not run"]
    assert "budget" in outcomes[1].summary
