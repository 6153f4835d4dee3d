#!/usr/bin/env bash
# Runs the benchmarks on SQLite and, when a database is given, PostgreSQL; then draws the plot.
#   bench/run.sh                       # SQLite only
#   TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test bench/run.sh
#   bench/run.sh --quick               # shorter phases, 10,000 webhooks end to end
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench load -- --store sqlite --out bench/results "$@"
if [ -n "${BENCH_DATABASE_URL:-${TEST_DATABASE_URL:-}}" ]; then
  cargo bench --bench load -- --store postgres --out bench/results "$@"
fi
if [ ! -x bench/.venv/bin/python ]; then
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install --quiet matplotlib==3.9.2
fi
bench/.venv/bin/python bench/plot.py
