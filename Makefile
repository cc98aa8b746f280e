# meancache developer entry points. `make demo`, `make test` and `make docs` each create .venv on first use.
#
# PYTHON  interpreter used to create the virtual environment (default python3)
# VENV    where the virtual environment lives (default .venv)
#
# Build switches (MEANCACHE_SKIP_CUDA_BUILD, TORCH_CUDA_ARCH_LIST, MAX_JOBS, ...) are read from the environment by
# setup.py; see the comment block at its top.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.meancache-installed
DOCS_STAMP := $(VENV)/.meancache-docs-installed

.PHONY: setup test demo bench clean wheel check-wheel cmake-build emulate-kernels gpu-check docs docs-setup

setup: $(STAMP)

# Reinstall whenever the pinned requirements or the packaging change.
$(STAMP): requirements.txt pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade -r requirements.txt
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests --doctest-modules meancache -q

demo: $(STAMP)
	$(PY) -m meancache.examples.demo

# The documentation site (mkdocs.yml, docs/, the API reference generated from the docstrings) into site/. --strict:
# a broken link or anchor, a missing page or a reference that does not resolve fails the build. The doc
# dependencies (requirements-docs.txt, pinned; the `docs` extra) go into the same .venv, never into the core set.
docs-setup: $(DOCS_STAMP)

$(DOCS_STAMP): requirements-docs.txt $(STAMP)
	$(PY) -m pip install -r requirements-docs.txt
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

# Kernel benchmarks (pytest-benchmark). With a GPU: timed, JSON saved under bench/; without: every benchmark runs
# once as a smoke test (CPU timings of GPU kernels mean nothing).
bench: $(STAMP)
	if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(PY) -m pytest bench -q --benchmark-json=bench/last-run.json; \
	else \
		$(PY) -m pytest bench -q --benchmark-disable; \
	fi

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache meancache/_C*.so site

# CUDA wheel into dist/, for the default arch list unless TORCH_CUDA_ARCH_LIST is set (see setup.py).
wheel: $(STAMP)
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

# The newest dist/meancache-*.whl, installed into a fresh venv with a plain torch: imports, op registration, and
# SASS/PTX for every arch of the list (cuobjdump).
check-wheel: $(STAMP)
	PYTHON=$(PY) bash tools/check_wheel.sh

# Developer build of the same csrc/ with CMake into build/cmake (compile_commands.json).
cmake-build: $(STAMP)
	PYTHON=$(PY) bash tools/build_cmake.sh

# The CUDA kernels run on the CPU (every grid thread in turn) against a plain loop: indexing, vector path, tail and
# aliased ring slots, without a GPU.
emulate-kernels: $(STAMP)
	PYTHON=$(PY) bash tools/emulate_kernels.sh

# Every GPU figure from one run on a GPU machine (tools/gpu_check.py; docs/kernels.md, "GPU check"): in-place build
# for the local GPU, correctness of every op x backend, compute-sanitizer, benchmarks, FLUX end to end; results in
# $OUT or bench/gpu-check/. Deliberately not on $(STAMP): the GPU machine gets the tree without .venv and runs it
# with its own python3, so the venv's interpreter is used only when it exists. Without a GPU: the plan, "no CUDA
# device: nothing measured", exit 0. Extra options through GPU_CHECK_ARGS, e.g. GPU_CHECK_ARGS="--stages env,build".
gpu-check:
	PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bash tools/gpu_check.sh $(GPU_CHECK_ARGS)
