# linearpatch — see README.md. `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
GO ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
BIN := bin/linearpatch
SHARED ?= ../shared
GOTESTFLAGS ?=

.PHONY: all deps build build-purego test test-openblas test-purego test-coretypes vet bench demo fuzz clean

all: build

# OpenBLAS backs the engine's matmuls; install Debian's libopenblas-dev when it is missing.
deps:
	@if ! { [ -f /usr/include/x86_64-linux-gnu/cblas.h ] || [ -f /usr/include/cblas.h ]; } || ! ldconfig -p | grep -q libopenblas; then \
		echo "make: libopenblas-dev is missing; installing it with apt-get (needs root)"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq libopenblas-dev; \
	fi

build: deps
	$(GO) build -o $(BIN) ./cmd/linearpatch

# The pure-Go build: no cgo, gonum's BLAS.
build-purego:
	CGO_ENABLED=0 $(GO) build -o $(BIN)-purego ./cmd/linearpatch

vet: deps
	$(GO) vet ./...
	CGO_ENABLED=0 $(GO) vet ./...

test: deps vet test-openblas test-purego

test-openblas: deps
	@echo "== tests, OpenBLAS build =="
	$(GO) test -count=1 -timeout 45m $(GOTESTFLAGS) ./...

test-purego:
	@echo "== tests, pure-Go build (CGO_ENABLED=0) =="
	CGO_ENABLED=0 $(GO) test -count=1 -short -timeout 45m $(GOTESTFLAGS) ./...

# By hand, not in `make test` or CI: the BLAS-dependent packages under every OpenBLAS
# kernel set this CPU can run (Prescott, Haswell, SkylakeX), so no test relies on one
# kernel's rounding. CI leaves OPENBLAS_CORETYPE as the machine sets it.
test-coretypes: deps
	GO=$(GO) scripts/test-coretypes.sh $(GOTESTFLAGS)

# Benchmarks print ratios measured within one run (the machines are shared and noisy).
bench: build
	@echo "== engine forward vs sgemm (OpenBLAS build) =="
	./$(BIN) bench
	@echo "== half-precision weights: teacher peak RSS of a 2048-token window, BF16 vs float32 forward (LLaMA-3-8B shapes, 4 layers: a 3.8 GB model written to a temporary directory, about 8 GB of RAM) =="
	./$(BIN) bench-dtype --like $(SHARED)/tokenizers/llama3/config.json --layers 4 --dtype bf16
	@echo "== student KD step: throughput, memory, projection of the paper's run =="
	GOMEMLIMIT=4GiB ./$(BIN) bench-student
	@echo "== data-parallel distillation: 2 student processes × 1 thread vs 1 × 1, d=1024, --batch 4 (target ≥ 1.8× on an idle 2-core machine) =="
	./$(BIN) bench-students --students 2 --batch 4 --steps 6
	@echo "== tokenizer.json encoding: MB/s of text on one core (llama3, qwen3, mistral; floor 1 MB/s) =="
	$(GO) test -run '^$$' -bench BenchmarkHFTokenizerEncode -benchtime 3x -cpu 1 ./model/
	@echo "== kernels =="
	$(GO) test -run '^$$' -bench . -benchtime 3x ./model/tensor/
	@echo "== JetStream transport: activation batches, d=1024 float16 k=50 =="
	$(GO) test -run '^$$' -bench BenchmarkTransport -benchtime 500x ./worker/
	@echo "== teacher scaling: coordinator + cache + teachers as processes (about 5 min) =="
	LINEARPATCH_BENCH_PIPELINE=1 $(GO) test -run '^$$' -bench BenchmarkTeacherScaling -benchtime 2x -timeout 30m ./cmd/linearpatch/

# The whole pipeline on the shared model: embedded NATS, 2 teachers, stats phase → training-free
# patch → activation cache → student → export, then a comparison on valid.txt.
DEMO_DIR ?= out/demo
demo: build
	@rm -rf $(DEMO_DIR)
	@if [ -d $(SHARED)/models/tinystories-8L ]; then \
		echo "make: demo on $(SHARED)/models/tinystories-8L (results in $(DEMO_DIR))"; \
		./$(BIN) run --model $(SHARED)/models/tinystories-8L \
			--calib $(SHARED)/data/tinystories/train.txt --train $(SHARED)/data/tinystories/train.txt \
			--num-prune 2 --teachers 2 --eval $(SHARED)/data/tinystories/valid.txt \
			--out $(DEMO_DIR)/model --report $(DEMO_DIR)/report; \
	else \
		echo "make: $(SHARED)/models/tinystories-8L is missing; running the demo on a synthetic model instead"; \
		./$(BIN) synth --out $(DEMO_DIR)/synth --dim 128 --layers 6 --heads 4 --kv-heads 2 --ffn 352 --vocab 512 --data $(DEMO_DIR)/synth-data.jsonl && \
		./$(BIN) run --model $(DEMO_DIR)/synth --calib $(DEMO_DIR)/synth-data.jsonl --train $(DEMO_DIR)/synth-data.jsonl \
			--num-prune 1 --teachers 2 --out $(DEMO_DIR)/model --report $(DEMO_DIR)/report; \
	fi

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzSafetensorsHeader -fuzztime 30s ./model/
	$(GO) test -run '^$$' -fuzz FuzzLlama2cHeader -fuzztime 30s ./model/
	$(GO) test -run '^$$' -fuzz FuzzSentencePiece -fuzztime 30s ./model/
	$(GO) test -run '^$$' -fuzz FuzzHFTokenizerJSON -fuzztime 30s ./model/
	$(GO) test -run '^$$' -fuzz FuzzHFTokenizerEncode -fuzztime 30s ./model/
	$(GO) test -run '^$$' -fuzz FuzzParseConfig -fuzztime 30s ./model/
	$(GO) test -run '^$$' -fuzz FuzzColumnarData -fuzztime 30s ./model/
	$(GO) test -run '^$$' -fuzz FuzzLoadTask -fuzztime 30s ./model/

clean:
	rm -rf bin
