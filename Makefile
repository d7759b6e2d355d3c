# tbprobe: `make demo` runs the demo, `make test` runs the tests. Both set up .venv first.
PY := .venv/bin/python

.PHONY: venv chromium demo test lint format protos bench clean docs-screenshots

venv:
	@bash scripts/setup_venv.sh

demo: venv
	$(PY) -m tbprobe.cli demo

test: venv chromium
	$(PY) -m pytest -q

# Headless Debian chromium for the TensorBoard dashboard screenshots in tests/e2e (needs root).
chromium:
	@bash scripts/install_chromium.sh

# Refresh docs/tensorboard-*.png from a fresh run of the screenshot tests.
docs-screenshots: venv chromium
	TBPROBE_UPDATE_DOCS=1 $(PY) -m pytest -q tests/e2e/test_dashboard_screenshots.py

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: venv
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Regenerate tbprobe/writer/proto/*_pb2.py. grpcio-tools 1.62.x emits protobuf-4.25 gencode,
# which imports under every protobuf runtime from 4.25 to 7.x (newer generators refuse older runtimes).
protos:
	python3 -m venv /tmp/tbprobe-protoc
	/tmp/tbprobe-protoc/bin/pip install -q grpcio-tools==1.62.3
	/tmp/tbprobe-protoc/bin/python -m grpc_tools.protoc -I. --python_out=. tbprobe/writer/proto/*.proto

bench: venv
	$(PY) benchmarks/bench_writer.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache

# The prepared GPU check, run on the GPU machine (how: the top of benchmarks/gpu_check.sh).
.PHONY: gpu-check
gpu-check:
	bash benchmarks/gpu_check.sh
