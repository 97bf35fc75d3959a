#!/usr/bin/env bash
# Tests of Procurator's Nix side with the real Nix here and no nixpkgs, no
# network: nix/lib.nix (blueprint, defaults, every validation error, built
# toplevels), the NixOS modules (through ./stub-nixos.nix), the top flake's
# `lib` without nixpkgs, and example/flake.nix through the real flake
# commands CI runs. Exits non-zero on the first mismatch.
#
# Needs nix (2.8 or later) and /bin/busybox for the sandbox's /bin/sh; run as
# root (or with a Nix daemon). PROCURATOR_CTL, or target/debug/procurator-ctl
# when built, also checks the blueprint with `procurator-ctl validate`.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
tests="$repo/nix/tests"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# A configuration of our own: flakes on, no substituters (nothing to wait
# for), a sandbox whose /bin/sh is busybox.
export NIX_CONF_DIR="$tmp/conf"
export NIX_USER_CONF_FILES="$NIX_CONF_DIR/nix.conf"
export XDG_CACHE_HOME="$tmp/cache"
mkdir -p "$NIX_CONF_DIR"
cat >"$NIX_CONF_DIR/nix.conf" <<'EOF'
experimental-features = nix-command flakes
build-users-group =
substituters =
sandbox = true
sandbox-paths = /bin/sh=/bin/busybox
EOF

passed=0
failed=0
pass() {
    passed=$((passed + 1))
    printf 'ok   %s\n' "$1"
}
fail() {
    failed=$((failed + 1))
    printf 'FAIL %s\n' "$1" >&2
    shift
    [[ $# -eq 0 ]] || printf '     %s\n' "$@" >&2
    printf '\n%s passed, %s failed\n' "$passed" "$failed"
    exit 1
}

# Nix colours its errors even when stderr is not a terminal.
strip_ansi() { sed 's/\x1b\[[0-9;]*m//g'; }

# `nix eval --json` of an expression that must succeed.
eval_json() {
    local out
    if ! out=$(nix eval --json --impure --expr "$1" 2>"$tmp/stderr"); then
        fail "${2:-eval}" "$(strip_ansi <"$tmp/stderr")"
    fi
    printf '%s' "$out"
}

expect_equal() { # NAME EXPECTED ACTUAL
    if [[ $2 == "$3" ]]; then
        pass "$1"
    else
        fail "$1" "expected: $2" "actual:   $3"
    fi
}

# Expects `nix eval` of EXPR to fail with MESSAGE in its error.
expect_error() { # NAME EXPR MESSAGE
    local err
    if nix eval --json --impure --expr "$2" >/dev/null 2>"$tmp/stderr"; then
        fail "$1" "expected an error containing: $3" "but it evaluated"
    fi
    err=$(strip_ansi <"$tmp/stderr")
    if [[ $err == *"$3"* ]]; then
        pass "$1"
    else
        fail "$1" "expected an error containing: $3" "got: $err"
    fi
}

# `nix build --json` prints [{"drvPath":…,"outputs":{"out":"/nix/store/…"}}]
# (2.8 has no --print-out-paths).
out_path() { sed -n 's/.*"out":"\([^"]*\)".*/\1/p'; }

echo "== parse every .nix file"
while IFS= read -r -d '' file; do
    if nix-instantiate --parse "$file" >/dev/null 2>"$tmp/stderr"; then
        pass "parse ${file#"$repo"/}"
    else
        fail "parse ${file#"$repo"/}" "$(strip_ansi <"$tmp/stderr")"
    fi
done < <(find "$repo/flake.nix" "$repo/nix" "$repo/example" -name '*.nix' -print0 | sort -z)

echo "== lib.mkCluster: the blueprint"
cluster="import $tests/cluster.nix"
expected=$(eval_json "builtins.fromJSON (builtins.readFile $tests/expected-blueprint.json)")
blueprint=$(eval_json "($cluster { }).blueprintJSON" "blueprintJSON")
expect_equal "blueprintJSON is the blueprint object, defaults filled" "$expected" "$blueprint"
expect_equal "blueprint equals blueprintJSON" "$blueprint" \
    "$(eval_json "($cluster { }).blueprint")"
expect_equal "blueprintJSON never evaluates nixosSystem" "$blueprint" \
    "$(eval_json "($cluster { nixosSystem = throw \"nixosSystem was evaluated\"; }).blueprintJSON")"
expect_equal "nixosConfigurations has every machine" '["control-plane-1","worker-1","worker-2"]' \
    "$(eval_json "builtins.attrNames ($cluster { nixosSystem = throw \"nixosSystem was evaluated\"; }).nixosConfigurations")"
expect_equal "healthCheck fills its defaults" '{"command":"true","enabled":true,"interval":10,"timeout":60}' \
    "$(eval_json "(import $repo/nix/lib.nix).healthCheck { command = \"true\"; }")"
expect_equal "names of 1 and 63 characters, '_' and '-', are machine names" \
    '["a","a23456789b123456789c123456789d123456789e123456789f123456789xyz","db_2","worker-1"]' \
    "$(eval_json "let valid = { role = \"r\"; cpu = 1; memory = { amount = 1; unit = \"GB\"; }; deployment = { addr = \"a\"; backend = \"b\"; }; };
      in builtins.attrNames ((import $repo/nix/lib.nix).mkCluster { machines = {
        a = valid; a23456789b123456789c123456789d123456789e123456789f123456789xyz = valid; db_2 = valid; worker-1 = valid; }; }).blueprintJSON")"

echo "== lib.mkCluster: the toplevels"
declare -A closures
for machine in control-plane-1 worker-1 worker-2; do
    expr="($cluster { }).nixosConfigurations.$machine.config.system.build.toplevel"
    if ! json=$(nix build --no-link --json --impure --expr "$expr" 2>"$tmp/stderr"); then
        fail "build $machine" "$(strip_ansi <"$tmp/stderr")"
    fi
    out=$(out_path <<<"$json")
    [[ $out == /nix/store/*-nixos-system-$machine && -x $out/bin/switch-to-configuration ]] ||
        fail "build $machine" "unexpected output: $json"
    pass "build $machine -> $out"
    closures[$machine]=$out
    expect_equal "$machine: host name is the machine name" "$machine" "$(cat "$out/hostname")"
    expect_equal "$machine: shared modules, then its configuration" "common $machine" "$(cat "$out/markers")"
    expect_equal "$machine: system and specialArgs passed on" "x86_64-linux fleet" \
        "$(cat "$out/system") $(cat "$out/special-args")"
done

ctl=${PROCURATOR_CTL:-$repo/target/debug/procurator-ctl}
if [[ -x $ctl ]]; then
    cat >"$tmp/deployment.json" <<EOF
{"gitCommit":"0123456789abcdef0123456789abcdef01234567","blueprint":$blueprint,"closures":{
"control-plane-1":"${closures[control-plane-1]}","worker-1":"${closures[worker-1]}","worker-2":"${closures[worker-2]}"}}
EOF
    if "$ctl" validate "$tmp/deployment.json" >"$tmp/stdout" 2>&1; then
        pass "procurator-ctl validate accepts the blueprint"
    else
        fail "procurator-ctl validate accepts the blueprint" "$(cat "$tmp/stdout")"
    fi
else
    echo "skip procurator-ctl validate: $ctl is not built"
fi

echo "== lib.mkCluster: what it refuses"
mapfile -t cases < <(nix-instantiate --eval --strict --json --expr \
    "builtins.concatStringsSep \"\\n\" (builtins.attrNames (import $tests/cases.nix))" 2>/dev/null |
    sed 's/^"//; s/"$//; s/\\n/\n/g')
[[ ${#cases[@]} -gt 30 ]] || fail "list the error cases" "found only ${#cases[@]}"
for name in "${cases[@]}"; do
    message=$(eval_json "(import $tests/cases.nix).\"$name\".message")
    message=${message#\"}
    message=${message%\"}
    # Undo JSON's escapes of the message: \" and \\.
    message=${message//\\\"/\"}
    message=${message//\\\\/\\}
    expect_error "refuses: $name" "(import $tests/cases.nix).\"$name\".value" "$message"
done

echo "== NixOS modules (with the stub lib)"
expect_equal "agent and control-plane modules" "[]" "$(eval_json "import $tests/modules.nix" "modules.nix")"

echo "== the top flake's lib without nixpkgs"
flake_expr="let
  flake = import $repo/flake.nix;
  outputs = flake.outputs { self = outputs; nixpkgs = throw \"nixpkgs was evaluated\"; };
in"
expect_equal "flake: lib" '["healthCheck","mkCluster"]' \
    "$(eval_json "$flake_expr builtins.attrNames outputs.lib")"
expect_equal "flake: lib.mkCluster" "$blueprint" \
    "$(eval_json "$flake_expr (import $tests/cluster.nix { procurator = outputs.lib; }).blueprintJSON")"
expect_equal "flake: nixosModules" '["agent","control-plane","default","vm-guest"]' \
    "$(eval_json "$flake_expr builtins.attrNames outputs.nixosModules")"
expect_equal "flake: the modules wrap nix/modules" \
    "[\"$repo/nix/modules/agent.nix\",\"$repo/nix/modules/control-plane.nix\"]" \
    "$(eval_json "$flake_expr map (name: toString (builtins.head (outputs.nixosModules.\${name} {
      lib = (import $tests/stub-nixos.nix).lib; pkgs = { }; }).imports)) [ \"agent\" \"control-plane\" ]")"
expect_equal "flake: nixosModules.vm-guest is nix/modules/vm-guest.nix" \
    "\"$repo/nix/modules/vm-guest.nix\"" \
    "$(eval_json "$flake_expr toString outputs.nixosModules.vm-guest")"
expect_equal "flake: nixpkgs is the only input" '["nixpkgs"]' \
    "$(eval_json "builtins.attrNames (import $repo/flake.nix).inputs")"

echo "== example/flake.nix through the flake commands CI runs"
# Flakes in a git repository see only tracked files: copy what is needed.
mkdir -p "$tmp/procurator" "$tmp/example" "$tmp/nixpkgs-throws" "$tmp/nixpkgs-fake"
cp -r "$repo/flake.nix" "$repo/nix" "$tmp/procurator/"
cp "$repo/example/flake.nix" "$tmp/example/"
# A nixpkgs that must never be evaluated, and one whose nixosSystem is the
# fake (no nixpkgs here to build real systems from).
cat >"$tmp/nixpkgs-throws/flake.nix" <<'EOF'
{ outputs = _: throw "nixpkgs was evaluated"; }
EOF
cp "$tests/fake-nixos-system.nix" "$tmp/nixpkgs-fake/"
cat >"$tmp/nixpkgs-fake/flake.nix" <<'EOF'
{ outputs = _: { lib.nixosSystem = import ./fake-nixos-system.nix; }; }
EOF
flake_args() { # NIXPKGS
    printf '%s\n' --no-write-lock-file \
        --override-input nixpkgs "path:$tmp/$1" \
        --override-input procurator "path:$tmp/procurator"
}
mapfile -t throws_args < <(flake_args nixpkgs-throws)
mapfile -t fake_args < <(flake_args nixpkgs-fake)

if ! example=$(nix eval --json "path:$tmp/example#blueprintJSON" "${throws_args[@]}" 2>"$tmp/stderr"); then
    fail "example: nix eval --json .#blueprintJSON without nixpkgs" "$(strip_ansi <"$tmp/stderr")"
fi
pass "example: nix eval --json .#blueprintJSON without nixpkgs"
printf '%s' "$example" >"$tmp/example-blueprint.json"
example_json="builtins.fromJSON (builtins.readFile $tmp/example-blueprint.json)"
expect_equal "example: worker-1 as in the seed" \
    '{"cpu":2,"deployment":{"addr":"192.168.1.11","autoRollback":true,"backend":"cloud-hypervisor","sshPort":22,"sshUser":"root"},"labels":["worker","compute"],"memory":{"amount":2,"unit":"GB"},"replicas":1,"role":"worker"}' \
    "$(eval_json "let w = ($example_json).worker-1; in w // { deployment = builtins.removeAttrs w.deployment [ \"healthChecks\" ]; }")"
expect_equal "example: health checks filled in" '[10,5]' \
    "$(eval_json "map (c: c.interval) ($example_json).worker-1.deployment.healthChecks")"
expect_equal "example: machines" '["control-plane-1","worker-1","worker-2"]' \
    "$(eval_json "builtins.attrNames ($example_json)")"
for machine in control-plane-1 worker-1 worker-2; do
    attr="path:$tmp/example#nixosConfigurations.$machine.config.system.build.toplevel"
    if ! json=$(nix build --no-link --json "$attr" "${fake_args[@]}" 2>"$tmp/stderr"); then
        fail "example: nix build $machine" "$(strip_ansi <"$tmp/stderr")"
    fi
    out=$(out_path <<<"$json")
    expect_equal "example: nix build $machine" "$machine" "$(cat "$out/hostname")"
done

printf '\n%s passed, %s failed\n' "$passed" "$failed"
