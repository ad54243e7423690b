# Two commands do all set-up: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lfw-dlib lfw-aligned lfw-dlib-sweep fuzz reliability install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,cpu,teachers,export,tpu]'
	touch $(STAMP)

install: $(STAMP)

# glibc's transparent-huge-page tunable: XLA:CPU's per-step temporary buffer otherwise page-faults hundreds of
# thousands of fresh 4 KiB pages a step (see README, "Train-step throughput"). A process setting, so set here.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

# The thesis in miniature on the embedded synthetic face set (see README).
demo: $(STAMP)
	$(PY) -m facekd_jax.suite --config=configs/demo.py --workdir=runs/demo

# The thesis's question on real faces (README, docs/results.md): dlib's imported teacher, MobileFaceNet students,
# the rows the development sweep chose, three seeds, on LFW aligned from ../shared/data/lfw (LFW=DIR for another
# copy). Resumes where it stopped.
LFW ?= ../shared/data/lfw
lfw-dlib: $(STAMP) runs/lfw_aligned
	$(PY) -m facekd_jax.suite --config=configs/lfw_dlib.py --workdir=runs/lfw_dlib --seeds=3

# LFW aligned by dlib's five landmarks (python -m facekd_jax.data.convert align; about 15 minutes on 2 cores), where
# configs/lfw_dlib.py reads it.
lfw-aligned: runs/lfw_aligned
runs/lfw_aligned: | $(STAMP)
	$(PY) -m facekd_jax.data.convert align --lfw=$(LFW) --output=$@ --no-progress

# Every setting configs/lfw_dlib.py lists under SWEEP, on LFW's development split (docs/results.md).
lfw-dlib-sweep: $(STAMP) runs/lfw_aligned
	$(PY) -m facekd_jax.sweep --config=configs/lfw_dlib.py --workdir=runs/lfw_dlib_sweep

# Bad input by the thousand: 10,000 mutants per reader (hours on 2 cores; PER_READER=N for fewer), then the
# reliability page (docs/reliability.md) from the fault-scenario tests and those figures.
PER_READER ?= 10000
fuzz: $(STAMP)
	mkdir -p runs/fuzz
	$(PY) benchmarks/fuzz.py --per-reader $(PER_READER) --json runs/fuzz/fuzz.json
# Several fuzz runs on one page (e.g. cheap readers at 10,000, slow ones fewer): FUZZ_JSON="a.json b.json".
FUZZ_JSON ?= runs/fuzz/fuzz.json
reliability: $(STAMP)
	$(PY) benchmarks/reliability.py $(foreach f,$(FUZZ_JSON),--fuzz-json $(f))

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -q --durations=20 tests

clean:
	rm -rf $(VENV) runs
