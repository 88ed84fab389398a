# The two commands of the README: `make demo` and `make test`.
PY ?= python3
PIP := $(PY) -m pip

.PHONY: install demo test test-capped bench clean

install:
	$(PIP) install -q -e ".[dev]"
	# tinysoundfont's pyaudio dependency is for live playback only and does not build
	$(PIP) install -q --no-deps "tinysoundfont==0.3.7"

demo: install
	$(PY) -m dvc repro
	@echo ""
	@echo "Demo corpus:    data/demo/ (FLAC renderings + captions.jsonl)"
	@echo "Audio shards:   data/audio/ (train-*.tar, valid-*.tar, manifest.parquet, rejects.parquet)"
	@echo "Models:         models/ (codec, semantic, semantic_kmeans, mulan, mulan_rvq, lm_*)"
	@echo "Token shards:   data/tokens/ (train-*.tar, valid-*.tar, index.parquet, manifest.json)"
	@echo "Metrics:        reports/metrics.json (every stage's figures) and metrics/*.json  ->  dvc metrics show;  curves: dvc plots show"
	@echo "Generated audio: data/generated/gen-NNN.wav (prompts in data/generated/prompts.json)"
	@echo "Report:         reports/report.html  (open it in a browser)"
	@echo "Generate more:  cantus generate \"a fast Irish reel on fiddle\" --seconds 10 --out reel.wav"

test: install
	$(PY) -m pytest -q --durations=25

# The quick suite once per kernel cap of cantus/kernels.py: ATen, oneDNN and
# faiss held to AVX2, then to their generic code. `cantus.kernels --check` fails
# the run unless the cap took effect, and prints what runs. OpenBLAS stays as
# the machine sets it.
test-capped: install
	@for cap in avx2 default; do \
	  vars="$$($(PY) -m cantus.kernels --env $$cap)"; \
	  echo "== quick suite under the $$cap kernel cap: $$vars"; \
	  env $$vars $(PY) -m cantus.kernels --check $$cap || exit 1; \
	  env $$vars $(PY) -m pytest -q -m "not slow" -p no:cacheprovider || exit 1; \
	done

bench: install
	$(PY) bench/ingest.py

clean:
	rm -rf data/cache .pytest_cache
