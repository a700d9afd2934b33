# The two commands of the README: `make demo` (the main job, end to end) and `make test` (the test suite).
# Both create the virtual environment first; nothing is downloaded at run time (HF_HUB_OFFLINE=1).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: env demo test bench bench-quick clean

env: $(VENV)/.installed

# torch is pinned to the build that lies on this project's machines (the CUDA build of 2.14.1); installing it
# before the project keeps pip from resolving another torch for open_clip_torch.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[cpu,train,data,dev]"
	touch $@

demo: env
	$(BIN)/diki-edge demo --out demo-out

test: env
	$(BIN)/python -m pytest -q

bench: env
	$(BIN)/python -m benchmarks

bench-quick: env
	$(BIN)/python -m benchmarks --quick

clean:
	rm -rf $(VENV) demo-out
