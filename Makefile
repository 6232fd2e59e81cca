# Each target sets up the virtual environment itself when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LMMS_EVAL := lmms-eval==0.7.3
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: help setup test test-fast sweep sweep-full report ui bench bench-compare bench-baseline bench-decode shape-check ablation train-embedded train-twig clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 18

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,lmms]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps $(LMMS_EVAL)
	touch $(STAMP)

setup: $(STAMP)  ## create/refresh the virtual environment (.venv)

test: $(STAMP)  ## run every test (the slow end-to-end runs and the speed gate in tests/bench included)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## the tests without the slow end-to-end runs and the speed benchmarks
	$(BIN)/python -m pytest -q -m "not slow and not bench"

sweep: $(STAMP)  ## the main job: experiments/default.yaml on the embedded model -> MLflow + report
	$(BIN)/twigbench sweep experiments/default.yaml

sweep-full: $(STAMP)  ## experiments/full.yaml: the main job with every sample timed (~25-35 min on 2 cores)
	$(BIN)/twigbench sweep experiments/full.yaml

report: $(STAMP)  ## rewrite the default experiment's report from MLflow
	$(BIN)/twigbench report default

ui: $(STAMP)  ## MLflow UI on http://127.0.0.1:5000 for ./mlflow.db
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning  (Ctrl-C to stop;"
	@echo "  make sweep / make report print the link to a sweep's curves)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

BENCH_STORAGE := file://$(CURDIR)/.benchmarks

bench: $(STAMP)  ## speed benchmarks with their gate; saves the run under .benchmarks/ for bench-compare
	$(BIN)/python -m pytest tests/bench -q --benchmark-save=bench --benchmark-storage=$(BENCH_STORAGE)

bench-compare: $(STAMP)  ## speed benchmarks against the last saved run; fails where a median is 25 % slower
	$(BIN)/python -m pytest tests/bench -q --benchmark-storage=$(BENCH_STORAGE) \
		--benchmark-compare --benchmark-compare-fail=median:25%

bench-baseline: $(STAMP)  ## measure and write tests/bench/expected.json (the gate's ratios; review the diff)
	$(BIN)/python -m pytest tests/bench -q --bench-update
	-git diff --stat tests/bench/expected.json

bench-decode: $(STAMP)  ## decode-speed table of greedy, SSD, TTP+SSD, FastV on the long-description task
	$(BIN)/python -m tools.bench_decode

shape-check: $(STAMP)  ## LLaVA-1.5-7B-shaped random model: baseline/FastV/TTP prefill (GPU; --tiny elsewhere)
	$(BIN)/python -m tools.shape_check

train-twig: $(STAMP)  ## retrain the embedded model's twig (K=1, T=2; resumable)
	$(BIN)/python -m tools.train_twig --model embedded --K 1 --T 2 --lr 5e-4 --steps 1500 --out build/twig-K1-T2 --precision fp32
	mkdir -p harness/models/embedded/twigs/K1-T2
	cp build/twig-K1-T2/twig.safetensors build/twig-K1-T2/twig.json harness/models/embedded/twigs/K1-T2/

ABLATION_TWIGS := K1-T2-copy K1-T2-random K1-T2-last K1-T1-copy K1-T3-copy K0-T2-copy K2-T2-copy K3-T2-copy

ablation: $(STAMP) $(foreach t,$(ABLATION_TWIGS),build/twigs/$(t)/twig.safetensors)  ## TwigVLM ablations (trains their twigs first)
	$(BIN)/twigbench sweep experiments/ablation_twig.yaml

# ablation twigs train 600 steps each (~4-10 min on 2 cores), the default twig 1500: the ablation
# compares its variants with K1-T2-copy, trained the same way as they are
build/twigs/%/twig.safetensors: harness/models/embedded/llava-tiny-shapes/model.safetensors | $(STAMP)
	$(BIN)/python -m tools.train_twig --model embedded --lr 5e-4 --steps 600 --precision fp32 --out build/twigs/$* \
		--K $(subst K,,$(word 1,$(subst -, ,$*))) --T $(subst T,,$(word 2,$(subst -, ,$*))) \
		--init $(word 3,$(subst -, ,$*))

train-embedded: build/embedded-6/final/model.safetensors  ## retrain the embedded model: the six stages of its card (~6 h on 2 cores; rerun to resume)
	@echo "evaluate and install: $(BIN)/python -m tools.publish_embedded build/embedded-6/final"

# each stage writes final/ only when it ends; an interrupted one resumes from its ckpt.pt
build/embedded-1/final/model.safetensors: | $(STAMP)
	$(BIN)/python -m tools.train_embedded --recipe neutral --out build/embedded-1 --tower-layers 8 --proj-aux-weight 0.3 --object-weight 1.0 --where-weight 0.3 --where-balance --canvas-sides 72,88,104,120 --text-only 0.05 --stop-step 1601
build/embedded-2/final/model.safetensors: build/embedded-1/final/model.safetensors
	$(BIN)/python -m tools.train_embedded --recipe neutral --out build/embedded-2 --init-from build/embedded-1/final --steps 2000 --lr 0.0008 --seed 111 --carry-heads --warmup 30 --turn-mean-from 300 --proj-aux-weight 0.3 --object-weight 1.0 --where-weight 0.3 --where-balance --canvas-sides 40,48,56,64,72,88,104,120 --text-only 0.05
build/embedded-3/final/model.safetensors: build/embedded-2/final/model.safetensors
	$(BIN)/python -m tools.train_embedded --recipe neutral --out build/embedded-3 --init-from build/embedded-2/final --steps 1500 --lr 0.0003 --seed 121 --carry-heads --warmup 30 --turn-mean-from 0 --proj-aux-weight 0.3 --object-weight 1.0 --where-weight 0.3 --where-balance --canvas-sides 40,48,56,64,72,88,104,120 --text-only 0.05 --stop-step 251
build/embedded-4/final/model.safetensors: build/embedded-3/final/model.safetensors
	$(BIN)/python -m tools.train_embedded --recipe neutral --out build/embedded-4 --init-from build/embedded-3/final --steps 1500 --lr 0.0004 --seed 131 --carry-heads --warmup 30 --type-weights attribute=3,count=2,describe=2 --turn-mean-from 0 --proj-aux-weight 0.3 --object-weight 1.0 --where-weight 0.3 --where-balance --canvas-sides 40,48,56,64,72,88,104,120 --text-only 0.05
build/embedded-5/final/model.safetensors: build/embedded-4/final/model.safetensors
	$(BIN)/python -m tools.train_embedded --recipe neutral --out build/embedded-5 --init-from build/embedded-4/final --steps 1200 --lr 0.0004 --seed 151 --warmup 30 --type-weights attribute=4,count=1.5,describe=3,text=0.5 --attribute-forms shape-at=3,size=0.3 --turn-mean-from 0 --cls-weight 0.0 --ground-weight 0.0 --canvas-sides 40,48,56,64,72,88,104,120 --text-only 0.05 --freeze tower --precision fp32
build/embedded-6/final/model.safetensors: build/embedded-5/final/model.safetensors
	$(BIN)/python -m tools.train_embedded --recipe neutral --out build/embedded-6 --init-from build/embedded-5/final --steps 1200 --lr 0.0003 --seed 161 --warmup 30 --type-weights attribute=4,count=1.5,describe=3,text=0.5 --attribute-forms shape-at=3,size=0.3 --turn-mean-from 0 --cls-weight 0.0 --ground-weight 0.0 --canvas-sides 40,48,56,64,72,88,104,120 --text-only 0.05 --freeze tower --precision fp32

clean:  ## remove outputs (keeps .venv and mlflow.db)
	rm -rf build reports/out .pytest_cache
