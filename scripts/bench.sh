#!/usr/bin/env bash
# The benchmarks behind BENCHMARKS.md, as root on a fresh Debian/Ubuntu
# machine: installs what is missing, builds release binaries, then runs
#   procurator-bench swarm   (1,000 / 5,000 / 10,000 simulated agents)
#   procurator-bench swarm --replicas 3 --database postgres (10,000)
#   procurator-bench deploy  (real Nix, 1 and 10 test hosts, vs the floor)
#   procurator-bench ci      (plan on 20 and 100 generated machines, vs the floor)
# and writes their tables and JSON to bench-results/. BENCH_RUNS (default
# 5) sets the runs of each, e.g. `BENCH_RUNS=1 scripts/bench.sh` for a
# quick look. Run it on an otherwise idle machine: the figures are
# wall-clock times.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
"$repo/scripts/setup.sh"
export PATH="${HOME:-/root}/.cargo/bin:/usr/local/bin:$PATH"

runs=${BENCH_RUNS:-5}

cargo build --release --workspace --bins
out="$repo/bench-results"
mkdir -p "$out"
export PROCURATOR_BIN_DIR="$repo/target/release"

echo "==> procurator-bench swarm (about 15 minutes)"
target/release/procurator-bench swarm --agents 1000,5000,10000 --runs "$runs" \
    --json "$out/swarm.json" | tee "$out/swarm.txt"

echo "==> procurator-bench swarm over 3 replicas on PostgreSQL (about 5 minutes)"
target/release/procurator-bench swarm --agents 10000 --runs "$runs" --replicas 3 \
    --database postgres --json "$out/swarm-replicas.json" | tee "$out/swarm-replicas.txt"

echo "==> procurator-bench deploy (about 1 minute)"
target/release/procurator-bench deploy --runs "$runs" \
    --json "$out/deploy.json" | tee "$out/deploy.txt"

echo "==> procurator-bench ci (about 5 minutes)"
target/release/procurator-bench ci --machines 20,100 --runs "$runs" \
    --json "$out/ci.json" | tee "$out/ci.txt"

echo "==> results in $out"
