#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ (cargo fuzz, libFuzzer) for SECONDS each
# (default 30), two at a time, from the corpus kept in fuzz/corpus/TARGET.
# New inputs the fuzzers find go to a scratch directory, so the kept corpus
# changes only when someone adds to it. Exits non-zero if any target
# crashed, panicked, leaked past its memory limit or timed out, and prints
# the input that did it: add it to the target's corpus and to a test.
#
# scripts/setup.sh installs cargo-fuzz. Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="${HOME:-/root}/.cargo/bin:/usr/local/bin:$PATH"
# cargo fuzz passes nightly-only flags (-Zsanitizer, -Cpasses); the stable
# toolchain accepts them with this set.
export RUSTC_BOOTSTRAP=1

seconds=${1:-30}
shift || true
cd "$repo/fuzz"
if (($# > 0)); then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# No sanitizer: the code forbids `unsafe`, so the coverage instrumentation
# is what matters, and a build without ASan is much faster.
flags=(--sanitizer none --release --debug-assertions)
echo "fuzz: building ${targets[*]}"
cargo fuzz build "${flags[@]}"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

run() {
    local target=$1
    mkdir -p "$scratch/$target/new"
    # One allocation over 256 MiB, or 1 GiB in all, is a failure: nothing
    # a peer sends may cost memory out of proportion to its size.
    cargo fuzz run "${flags[@]}" "$target" "$scratch/$target/new" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=256 \
        -artifact_prefix="$scratch/$target/" -print_final_stats=1 \
        >"$scratch/$target/log" 2>&1
}

failed=()
pids=()
names=()
report() {
    local target=$1 status=$2
    local log="$scratch/$target/log"
    local runs
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    if ((status == 0)); then
        echo "fuzz: $target: ok, $runs runs in ${seconds} s, $(grep -o 'cov: [0-9]*' "$log" | tail -1)"
    else
        failed+=("$target")
        echo "fuzz: $target FAILED (exit $status):"
        # The panic's message, then how libFuzzer saw it.
        grep -A2 'panicked at' "$log" | head -6 || true
        grep -E '^(==[0-9]+== ERROR|SUMMARY):' "$log" || true
        for input in "$scratch/$target"/{crash,leak,timeout,oom,slow-unit}-*; do
            [[ -e $input ]] || continue
            echo "fuzz: $target: the input that did it ($(basename "$input")), base64:"
            base64 -w0 "$input"
            echo
        done
    fi
}
for target in "${targets[@]}"; do
    run "$target" &
    pids+=($!)
    names+=("$target")
    # Two at a time: this machine has two cores.
    if ((${#pids[@]} == 2)); then
        status=0
        wait "${pids[0]}" || status=$?
        report "${names[0]}" "$status"
        pids=("${pids[@]:1}")
        names=("${names[@]:1}")
    fi
done
for i in "${!pids[@]}"; do
    status=0
    wait "${pids[$i]}" || status=$?
    report "${names[$i]}" "$status"
done

if ((${#failed[@]} > 0)); then
    echo "fuzz: failed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} targets ran ${seconds} s each, nothing found"
