# The two commands of the README: `make demo` (the main job, end to end) and `make test` (the test suite).
# Both create the virtual environment first; nothing is downloaded at run time (HF_HUB_OFFLINE=1).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: env demo test bench bench-quick clean system-data

env: $(VENV)/.installed

# torch is pinned to the build that lies on this project's machines (the CUDA build of 2.14.1); installing it
# before the project keeps pip from resolving another torch for open_clip_torch.
$(VENV)/.installed: pyproject.toml runtime/pyproject.toml export/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ./runtime -e ./export -e ".[cpu,export,data,dev]"
	touch $@

demo: env
	$(BIN)/diki-edge demo --out demo-out

test: env system-data
	$(BIN)/python -m pytest -q

# Debian's Fashion-MNIST and Noto emoji (read by the dataset tests); installed when missing and apt is usable.
system-data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist fonts-noto-color-emoji >/dev/null; \
	  else echo "note: apt-get install dataset-fashion-mnist fonts-noto-color-emoji to run every dataset test"; fi; fi

bench: env
	$(BIN)/python -m benchmarks

bench-quick: env
	$(BIN)/python -m benchmarks --quick

clean:
	rm -rf $(VENV) demo-out
