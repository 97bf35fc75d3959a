#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this). Run as root from
# anywhere: installs what is missing, then formatting, lints, build, every
# test (the integration tests start the real binaries against real Nix),
# a short run of every fuzz target and a parse of every tracked .nix file.
# Exits non-zero on the first failure.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

"$repo/scripts/setup.sh"
# setup.sh's PATH changes do not reach this shell.
export PATH="${HOME:-/root}/.cargo/bin:/usr/local/bin:$PATH"

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --all --check (and the fuzz targets, a workspace of their own)"
cargo fmt --all --check
(cd fuzz && cargo fmt --check)

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# The integration tests run the binaries from target/debug.
step "cargo build --workspace --bins"
cargo build --workspace --bins

step "nix/tests/run.sh: the Nix library and modules, evaluated by real Nix"
"$repo/nix/tests/run.sh"

step "cargo test --workspace"
cargo test --workspace

step "scripts/fuzz.sh 30: every fuzz target for 30 s from its kept corpus"
"$repo/scripts/fuzz.sh" 30

step "nix-instantiate --parse on every tracked .nix file"
# A nix.conf of our own, as the tests use: nothing in /etc/nix is needed.
NIX_CONF_DIR=$(mktemp -d)
export NIX_CONF_DIR
trap 'rm -rf "$NIX_CONF_DIR"' EXIT
printf 'experimental-features = nix-command flakes\nbuild-users-group =\nsubstituters =\n' >"$NIX_CONF_DIR/nix.conf"
mapfile -t nix_files < <(git ls-files '*.nix')
for f in "${nix_files[@]}"; do
    nix-instantiate --parse "$f" >/dev/null
    echo "parsed $f"
done
echo "${#nix_files[@]} .nix files parsed"

step "all checks passed"
