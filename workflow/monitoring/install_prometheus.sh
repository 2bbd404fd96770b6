#!/usr/bin/env bash
# Debian's Prometheus 2.42: the server and promtool (`promtool check rules`, `promtool test rules`),
# with the console libraries the dashboard (consoles/wetstone.html) uses. As root, rerun-safe.
# Nothing is started: the package's own service is never used here (no systemd in containers);
# docs/monitoring.md starts `prometheus --config.file workflow/monitoring/prometheus.yml` by hand.
set -euo pipefail
"$(dirname "$0")/../ci/apt_install.sh" install_prometheus prometheus
prometheus --version 2>&1 | head -n 1
