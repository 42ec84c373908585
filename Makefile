# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION_DIR := /usr/share/datasets/fashion-mnist
# torch 2.14.1 / torchvision 0.29.1 are the releases on the build machines' local disk: pinning them keeps pip
# from downloading a newer multi-GB CUDA build. Override for another platform: make TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

# The offline switches, read from their one source, tasks/environment.py's OFFLINE_SWITCHES. Every Python
# process of the project sets them itself (configure_environment), but this Makefile also starts tools that
# never run that code: `mlflow ui`, `prefect server start` and `dvc repro`. Those need them exported here.
OFFLINE_SWITCHES := $(shell $(PYTHON) -B tasks/environment.py)
ifeq ($(OFFLINE_SWITCHES),)
$(error could not read the offline switches: $(PYTHON) -B tasks/environment.py printed nothing)
endif
$(foreach switch,$(OFFLINE_SWITCHES),$(eval export $(switch)))

.PHONY: install run lint test test-fast bench-gpu bench-gpu-stages ui serve prefect-server data repro clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

install: $(STAMP)

# Fashion-MNIST from Debian's package; without root or apt, the ingest stage says how to get it.
data:
	@if [ ! -e $(FASHION_DIR)/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

run: install data
	$(BIN)/sslpipe run

repro: install data
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

# Lint and type check first: both take seconds and fail before the long suite starts.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy ssl_lib

# One pytest-xdist worker per core; a test module stays on one worker, its tests in order (loadfile). The 20
# slowest tests are listed at the end, so a CI log says where the time went.
PYTEST_WORKERS ?= auto
test: install lint data
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=20

test-fast: install lint
	$(BIN)/python -m pytest -m "not slow"

# The throughput benchmark on a CUDA machine: ours in bf16, channels_last and compiled against lightly (fp32, as in
# its examples). "% of peak" is against a bf16 matmul timed on the same card, "peak MB" is
# torch.cuda.max_memory_allocated. Without a CUDA device the script stops with one line saying so. Five warm-up
# steps: the first is FLOP-counted (eager), the second compiles.
BENCH_GPU_ARGS ?= --warmup 5 --steps 50 --lightly-workers 0,4
bench-gpu: install data
	@$(BIN)/python benchmarks/throughput.py --device cuda --precision bf16 --channels-last on --compile on \
		$(BENCH_GPU_ARGS) --out benchmarks/results/throughput-gpu.md

# The default pipeline on a CUDA machine, every stage rerun (`sslpipe run --force`, the training stages on the GPU),
# then its stage table: each stage's wall time, its training steps' time, GFLOP/s and % of the card's peak, and where
# the rest went (benchmarks/stage_table.py). Without a CUDA device it stops with one line before running anything.
bench-gpu-stages: install data
	@$(BIN)/python benchmarks/stage_table.py --run --device cuda --out benchmarks/results/stage_table-gpu.md

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# A local Prefect server (127.0.0.1:$(PREFECT_PORT), 4200 by default) and the retrain deployment served on its cron
# schedule. `prefect server start --port` moves the API but not the URL its UI calls, which comes from
# PREFECT_API_URL or the settings' port (4200): the UI of a server on another port would then show "Can't connect"
# or, worse, another server's data. The server process is told its own API URL (tests/test_serve.py checks it).
PREFECT_PORT ?= 4200
PREFECT_API := http://127.0.0.1:$(PREFECT_PORT)/api
PREFECT_SERVER := PREFECT_SERVER_API_HOST=127.0.0.1 PREFECT_SERVER_API_PORT=$(PREFECT_PORT) \
	PREFECT_UI_API_URL=$(PREFECT_API) PREFECT_API_URL=$(PREFECT_API) \
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

# The server alone, in the foreground (what `serve` starts in the background).
prefect-server:
	$(PREFECT_SERVER)

serve: install
	$(PREFECT_SERVER) > .prefect-server.log 2>&1 & \
	server=$$!; trap "kill $$server" EXIT INT TERM; \
	for i in $$(seq 120); do \
		$(BIN)/python -c "import urllib.request as u; u.urlopen('$(PREFECT_API)/health', timeout=2)" 2>/dev/null && break; \
		sleep 1; \
	done; \
	echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)  (deployment ssl-retrain/nightly-retrain)"; \
	PREFECT_API_URL=$(PREFECT_API) $(BIN)/python -m flows.retrain serve

clean:
	rm -rf data/prepared artifacts results mlflow.db
