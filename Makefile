# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both (re)build .venv/ when pyproject.toml changed.
PY      := .venv/bin/python
STAMP   := .venv/.installed
# torch/torchvision must be a matching pair: the CUDA-capable 2.14.1/0.29.1 pair lies on this machine's disk
# (PyPI's torchvision does not import beside the on-disk CPU torch 2.13).
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: env demo test bench clean-env

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]' $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(PY) jobs/featurize_coco.py --demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(PY) -m pytest -q tests

clean-env:
	rm -rf .venv
