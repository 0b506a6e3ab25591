# Two commands on a fresh clone: `make demo` and `make test`. Each builds .venv on first use.
#
# torch is installed first from TORCH_SPEC, so that a CPU machine never resolves a multi-GB CUDA build:
#   make test TORCH_SPEC="torch==2.13.0"                       (default: the local CPU wheel here)
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"   (a GPU machine)

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_RECIPE ?= recipes/05_modern_gpt.py
PYTEST_ARGS ?= -n 2 --durations=15

BIN := $(VENV)/bin
STAMP := $(VENV)/.hf_models-installed

.PHONY: demo test lessons bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $@

demo: $(STAMP)
	$(BIN)/python $(DEMO_RECIPE)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

lessons: $(STAMP)
	for recipe in recipes/0*.py; do $(BIN)/python $$recipe || exit 1; done

# Every benchmark with its defaults. A script that needs what the defaults lack (gpt_vs_nanogpt.py:
# a nanoGPT checkout, NANOGPT_DIR=...) exits 77 with its reason as the last line on stderr; it is
# listed as skipped and the others still run. Any other failure fails the target, after the rest ran.
bench: $(STAMP)
	@ran=""; skipped=""; failed=""; log=$$(mktemp); \
	for script in benchmarks/*.py; do \
		echo "== $$script"; \
		$(BIN)/python $$script 2>$$log; status=$$?; cat $$log >&2; \
		case $$status in \
			0) ran="$$ran $$script";; \
			77) skipped="$$skipped\n  $$script: $$(tail -n 1 $$log | sed "s/^skipped: //")";; \
			*) failed="$$failed $$script";; \
		esac; \
	done; rm -f $$log; \
	printf '\nran:%s\nskipped:%b\nfailed:%s\n' "$${ran:- none}" "$${skipped:- none}" "$${failed:- none}"; \
	test -z "$$failed"

clean:
	rm -rf $(VENV) runs .pytest_cache
