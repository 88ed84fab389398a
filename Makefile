# The two commands of the README: `make demo` and `make test`.
PY ?= python3
PIP := $(PY) -m pip

.PHONY: install demo test test-all bench clean

install:
	$(PIP) install -q -e ".[dev]"
	# tinysoundfont's pyaudio dependency is for live playback only and does not build
	$(PIP) install -q --no-deps "tinysoundfont==0.3.7"

demo: install
	$(PY) -m dvc repro
	@echo ""
	@echo "Demo corpus:   data/demo/ (FLAC renderings + captions.jsonl)"
	@echo "Audio shards:  data/audio/ (train-*.tar, valid-*.tar, manifest.parquet, rejects.parquet)"
	@echo "Ingest stats:  metrics/ingest.json   (dvc metrics show)"

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) bench/ingest.py

clean:
	rm -rf data/cache .pytest_cache
