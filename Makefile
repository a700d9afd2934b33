# The two commands of the README: `make demo` (the main job, end to end) and `make test` (the test suite).
# Both create the virtual environment first; nothing is downloaded at run time (HF_HUB_OFFLINE=1).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: env demo test test-runtime docs lint bench bench-quick clean system-data

env: $(VENV)/.installed

# torch is pinned to the build that lies on this project's machines (the CUDA build of 2.14.1); installing it
# before the project keeps pip from resolving another torch for open_clip_torch.
$(VENV)/.installed: pyproject.toml runtime/pyproject.toml export/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e "./runtime[serve,openvino]" -e ./export -e ".[cpu,export,data,dev,docs]"
	touch $@

demo: env
	$(BIN)/diki-edge demo --out demo-out

test: env system-data
	$(BIN)/python -m pytest -q

# The runtime where it ships: its wheel alone (plus ONNX Runtime and pytest) in a fresh venv without torch, running
# tests/runtime from the repository root against the installed wheel (`pytest`, not `python -m pytest`, and `-I`
# keep the repository root off sys.path, so neither the source tree nor diki_edge/ can stand in for an install).
RUNTIME_VENV ?= .venv-runtime
test-runtime:
	rm -rf $(RUNTIME_VENV) dist/diki_edge_runtime-*.whl
	$(PYTHON) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/pip install --quiet --upgrade pip
	$(RUNTIME_VENV)/bin/pip wheel --quiet --no-deps runtime/ -w dist/
	$(RUNTIME_VENV)/bin/pip install --quiet "$$(ls dist/diki_edge_runtime-*.whl)[cpu,serve,openvino,test]"
	@ls -l dist/diki_edge_runtime-*.whl
	$(RUNTIME_VENV)/bin/python -I -c "import importlib.util as u, diki_edge_runtime as r; \
	  assert 'site-packages' in r.__file__, r.__file__; \
	  extra = [m for m in ('torch', 'open_clip', 'onnx', 'diki_edge', 'diki_edge_export') if u.find_spec(m)]; \
	  assert not extra, f'{extra} importable in the runtime-only venv'"
	$(RUNTIME_VENV)/bin/pytest -q -p no:cacheprovider tests/runtime

# Debian's Fashion-MNIST and Noto emoji (read by the dataset tests); installed when missing and apt is usable.
system-data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] || [ ! -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist fonts-noto-color-emoji >/dev/null; \
	  else echo "note: apt-get install dataset-fashion-mnist fonts-noto-color-emoji to run every dataset test"; fi; fi

# The documentation site into site/ (ignored); --strict turns every warning (a broken link, a docstring mkdocstrings
# cannot read) into a failure.
docs: env
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

lint: env
	$(BIN)/ruff check .

bench: env
	$(BIN)/python -m benchmarks --require-quiet

bench-quick: env
	$(BIN)/python -m benchmarks --quick

clean:
	rm -rf $(VENV) $(RUNTIME_VENV) demo-out dist site
