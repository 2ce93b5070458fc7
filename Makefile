# The README's two commands are `make demo` and `make test`; both set up first.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= runs/demo

.PHONY: setup lock services browser demo demo-cli serve worker reconciler migrate test test-fast reliability soak lint bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml client/pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh
	touch $@

# Resolve pyproject.toml's ranges afresh into constraints.txt, the exact versions setup installs;
# then `make test` and commit both.
lock:
	bash scripts/lock.sh

# Embedded service (API + worker, SQLite, local artifacts): prune the demo model through the API.
demo: setup
	$(PY) scripts/demo.py

# The engine alone, from the command line.
demo-cli: setup
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/lorp prune --model demo --num-layers 4 --method auto --out $(DEMO_OUT)

serve: setup
	$(VENV)/bin/lorp serve

worker: setup
	$(VENV)/bin/lorp worker

reconciler: setup
	$(VENV)/bin/lorp reconciler

migrate: setup
	$(VENV)/bin/lorp migrate

# Postgres and Redis on their standard local ports (started, or installed, when missing).
services:
	bash scripts/services.sh

# Headless Chromium for the web page's browser test (Debian's package, installed when missing).
browser:
	bash scripts/browser.sh

# The import contracts (pyproject.toml, [tool.importlinter]) are part of the tests: a crossing fails.
# Runs marked long (the soaks, the webhook receivers' recovery figure: minutes each) are make reliability's.
test: setup services browser
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not long" --durations=25

# Fault-injection, load and hostile-input suites only, at the size their figures are recorded at
# (a plain `make test` runs smaller loops and writes its records under the ignored var/reliability/),
# recorded into docs/reliability/; then docs/reliability.md.
reliability: setup services
	LORP_RELIABILITY_SIZE=full LORP_RELIABILITY_RESULTS=docs/reliability $(PY) -m pytest -q -m reliability tests/reliability
	$(PY) scripts/reliability_report.py > /dev/null

# The soaks at the issue's size: 1,000 jobs x 3 batches through lorp serve and through the full stack,
# side by side (hours on 2 cores), recorded beside the make-reliability rows; then docs/reliability.md.
soak: setup services
	LORP_SOAK_JOBS=1000 LORP_SOAK_BATCHES=3 LORP_RELIABILITY_RESULTS=docs/reliability sh -c '\
		$(PY) -m pytest -q -m reliability tests/reliability/test_soak.py -k embedded & embedded=$$!; \
		$(PY) -m pytest -q -m reliability tests/reliability/test_soak.py -k full_stack & full=$$!; \
		wait $$embedded; a=$$?; wait $$full; b=$$?; exit $$((a || b))'
	$(PY) scripts/reliability_report.py > /dev/null

# Engine and other server-free tests only (markers set per folder in tests/conftest.py).
test-fast: setup
	$(PY) -m pytest -q -m "unit and not slow"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) scripts/bench.py --out docs/benchmarks.md
	$(PY) scripts/bench_heal.py --budgets 4 6 8 --out docs/benchmarks.md
	$(PY) scripts/bench_moe.py --out docs/benchmarks.md
	$(PY) scripts/bench_moe_distill.py --out docs/benchmarks.md
	$(PY) scripts/bench_plans.py --out docs/benchmarks.md
	$(PY) scripts/bench_divergence.py --out docs/benchmarks.md
	$(PY) scripts/bench_tasks.py --out docs/benchmarks.md
	$(PY) scripts/bench_curve.py --out docs/benchmarks.md
	$(PY) scripts/bench_checkpoint.py --out docs/benchmarks.md
	$(PY) scripts/bench_execution.py --out docs/benchmarks.md
	$(PY) scripts/bench_choice.py --out docs/benchmarks.md
	$(PY) scripts/bench_distill.py --out docs/benchmarks.md

clean:
	rm -rf runs var .pytest_cache .ruff_cache .mypy_cache
