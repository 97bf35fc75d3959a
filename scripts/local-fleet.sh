#!/usr/bin/env bash
# The local fleet demo, end to end, on one machine as root: a control plane
# and three agents (control-plane-1, worker-1, worker-2), each agent on a
# test host of its own (its own Nix store and /run, in a mount namespace),
# deploying closures built with real Nix from the fixture flake
# (integration-tests/fixtures/fleet) through a signed file:// binary cache.
#
# Usage: scripts/local-fleet.sh [--keep | --stay] [--work-dir DIR] [--broken-health MACHINE]
#        scripts/local-fleet.sh --stop
#   --keep                   leave the work directory (logs, state, cache) behind
#   --stay                   leave the control plane and agents running after the
#                            demo, to try procurator-ctl on (status, deployments,
#                            cancel, rollback); prints the line that points ctl at it
#   --stop                   stop the fleet --stay left running, remove its files
#   --work-dir DIR           use DIR (must not exist or be empty) instead of a temp dir
#   --broken-health MACHINE  give MACHINE a closure whose health check fails,
#                            to watch it roll back
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
keep=0
stay=0
work=
broken=
# Where --stay says which fleet is running, for --stop and for new shells.
current=/run/procurator-local-fleet

usage() {
    sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# Stops every process group a --stay run recorded (SIGTERM, then SIGKILL
# after 10 s), then removes its files.
stop_stayed() {
    if [[ ! -f $current/work-dir ]]; then
        echo "local-fleet: no fleet left running by --stay (no $current/work-dir)"
        return 0
    fi
    local dir pid
    dir=$(cat "$current/work-dir")
    if [[ -f $dir/pids ]]; then
        while read -r pid; do
            kill -TERM -- "-$pid" 2>/dev/null || true
        done <"$dir/pids"
        while read -r pid; do
            for _ in $(seq 1 100); do
                kill -0 -- "-$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -KILL -- "-$pid" 2>/dev/null || true
        done <"$dir/pids"
    fi
    rm -rf "$dir" "$current"
    echo "local-fleet: stopped the fleet in $dir and removed it"
}

while (($# > 0)); do
    case "$1" in
        --keep) keep=1 ;;
        --stay) stay=1 ;;
        --stop)
            stop_stayed
            exit 0
            ;;
        --work-dir)
            [[ $# -ge 2 ]] || { usage >&2; exit 2; }
            work=$2
            shift
            ;;
        --broken-health)
            [[ $# -ge 2 ]] || { usage >&2; exit 2; }
            broken=$2
            shift
            ;;
        -h | --help) usage; exit 0 ;;
        *) echo "local-fleet: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if [[ -f $current/work-dir ]]; then
    echo "local-fleet: a fleet left running by --stay is in $(cat "$current/work-dir"); stop it first with scripts/local-fleet.sh --stop" >&2
    exit 1
fi
if ((keep && stay)); then
    echo "local-fleet: --stay keeps the files anyway; give one of --keep and --stay" >&2
    exit 2
fi

machines=(control-plane-1 worker-1 worker-2)
if [[ -n $broken ]]; then
    known=0
    for m in "${machines[@]}"; do [[ $m == "$broken" ]] && known=1; done
    if ((!known)); then
        echo "local-fleet: --broken-health wants one of: ${machines[*]}" >&2
        exit 2
    fi
fi

# Bold headings on a terminal, plain text in a log.
if [[ -t 1 ]]; then
    say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
else
    say() { printf '\n==> %s\n' "$*"; }
fi

"$repo/scripts/setup.sh"
export PATH="${HOME:-/root}/.cargo/bin:/usr/local/bin:$PATH"

say "building the binaries (cargo build --workspace --bins)"
(cd "$repo" && cargo build --workspace --bins)
bin="${CARGO_TARGET_DIR:-$repo/target}/debug"
ctl_bin="$bin/procurator-ctl"

if [[ -z $work ]]; then
    work=$(mktemp -d /tmp/procurator-local-fleet.XXXXXX)
else
    mkdir -p "$work"
    work=$(cd "$work" && pwd)
fi

# Every process started below is recorded here as the leader of a process
# group of its own, so cleanup stops it and whatever it started.
pids=()
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    local status=$?
    set +e
    if ((stay && status == 0)); then
        printf '%s\n' "${pids[@]}" >"$work/pids"
        mkdir -p "$current"
        echo "$work" >"$current/work-dir"
        cp "$work/env" "$current/env"
        exit 0
    fi
    for pid in "${pids[@]}"; do
        kill -TERM -- "-$pid" 2>/dev/null
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 100); do
            kill -0 -- "-$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    # The mounts lived in the agents' private namespaces: they are gone
    # with the agents, nothing to unmount here.
    if ((keep)); then
        echo "local-fleet: kept $work (logs: $work/control-plane.log, $work/hosts/*/agent.log)"
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "work directory: $work"

# Nix with a configuration of its own: nothing in /etc/nix is needed.
export NIX_CONF_DIR="$work/nix"
export XDG_CACHE_HOME="$work/xdg-cache"
mkdir -p "$NIX_CONF_DIR" "$XDG_CACHE_HOME"
cat >"$NIX_CONF_DIR/nix.conf" <<'EOF'
experimental-features = nix-command flakes
build-users-group =
substituters =
sandbox = true
sandbox-paths = /bin/sh=/bin/busybox
EOF

say "fleet PKI (procurator-ctl pki init / intermediate): agents enroll for their own"
pki="$work/pki"
"$ctl_bin" pki init --dir "$pki"
"$ctl_bin" pki intermediate --dir "$pki"
ls "$pki"

say "binary-cache signing key (nix key generate-secret)"
nix key generate-secret --key-name procurator-local-fleet-1 >"$work/cache.secret"
nix key convert-secret-to-public <"$work/cache.secret" >"$work/cache.public"
public_key=$(cat "$work/cache.public")
echo "$public_key"

say "intent key: what each machine does is signed (nix key generate-secret)"
nix key generate-secret --key-name procurator-local-intent-1 >"$work/intent.secret"
nix key convert-secret-to-public <"$work/intent.secret" >"$work/intent.public"
intent_key=$(cat "$work/intent.public")
echo "$intent_key"

flake="$work/flake"
mkdir -p "$flake"
# procurator-lib.nix links to nix/lib.nix: copy what it points at.
cp -L "$repo/integration-tests/fixtures/fleet/flake.nix" "$repo/integration-tests/fixtures/fleet/procurator-lib.nix" "$flake/"
toplevel() { echo "path:$flake#nixosConfigurations.$1.config.system.build.toplevel"; }

# settings.json of the fixture flake: generation N, maybe a broken machine.
write_settings() {
    local machines_json='{}'
    if [[ -n $2 ]]; then
        machines_json="{\"$2\": {\"health\": \"broken\"}}"
    fi
    printf '{ "generation": %s, "machines": %s }\n' "$1" "$machines_json" >"$flake/settings.json"
}

build_all() {
    local installables=() m
    for m in "${machines[@]}"; do installables+=("$(toplevel "$m")"); done
    nix build --no-link "${installables[@]}"
}

declare -A old new
say "building the machines' current closures (generation 0)"
write_settings 0 ""
build_all
for m in "${machines[@]}"; do old[$m]=$(nix eval --raw "$(toplevel "$m").outPath"); done

say "building the closures to deploy (generation 1${broken:+, $broken with a failing health check})"
write_settings 1 "$broken"
build_all
for m in "${machines[@]}"; do
    new[$m]=$(nix eval --raw "$(toplevel "$m").outPath")
    echo "$m => ${new[$m]}"
done

say "publishing them, signed, to file://$work/cache"
nix copy --to "file://$work/cache?secret-key=$work/cache.secret" "${new[@]}"

say "starting the control plane"
setsid "$bin/procurator-control-plane" \
    --listen 127.0.0.1:0 \
    --data-dir "$work/control-plane" \
    --tls-ca "$pki/ca.crt" \
    --tls-cert "$pki/control-plane.crt" \
    --tls-key "$pki/control-plane.key" \
    --issuing-ca-cert "$pki/issuing-ca.crt" \
    --issuing-ca-key "$pki/issuing-ca.key" \
    --ready-file "$work/control-plane.addr" \
    >"$work/control-plane.log" 2>&1 &
pids+=("$!")
cp_pid=$!
for _ in $(seq 1 300); do
    [[ -s $work/control-plane.addr ]] && break
    kill -0 "$cp_pid" 2>/dev/null || { cat "$work/control-plane.log" >&2; exit 1; }
    sleep 0.1
done
[[ -s $work/control-plane.addr ]] || { echo "local-fleet: the control plane did not get ready" >&2; exit 1; }
addr=$(tr -d '[:space:]' <"$work/control-plane.addr")
echo "listening on $addr"

export PROCURATOR_CONTROL_PLANE="https://$addr"
export PROCURATOR_TLS_CA="$pki/ca.crt"
export PROCURATOR_TLS_CERT="$pki/operator-admin.crt"
export PROCURATOR_TLS_KEY="$pki/operator-admin.key"
# What a new shell needs to reach this fleet as its operator (--stay).
printf 'export PROCURATOR_CONTROL_PLANE=%q PROCURATOR_TLS_CA=%q PROCURATOR_TLS_CERT=%q PROCURATOR_TLS_KEY=%q\n' \
    "$PROCURATOR_CONTROL_PLANE" "$PROCURATOR_TLS_CA" "$PROCURATOR_TLS_CERT" "$PROCURATOR_TLS_KEY" >"$work/env"

# A test host: HOST/root/nix is its store (seeded with its current closure),
# HOST/run its /run. The agent runs in a mount and PID namespace with those
# on /nix and /run, so its `nix` and /run/current-system are the host's own.
# shellcheck disable=SC2016 # expanded by the inner shell
namespace_script='set -e
mount --bind "$1/root/nix" /nix
mount --bind "$1/run" /run
[ -L /run/current-system ] || ln -s "$2" /run/current-system
[ -L /run/booted-system ] || ln -s "$2" /run/booted-system
shift 2
exec "$@"'

for m in "${machines[@]}"; do
    say "test host $m: a join token (procurator-ctl enroll-token), then its store seeded with ${old[$m]}"
    "$ctl_bin" enroll-token --name "$m" >"$work/$m.token"
    host="$work/hosts/$m"
    mkdir -p "$host/root" "$host/run" "$host/state"
    nix copy --no-check-sigs --to "$host/root" "${old[$m]}"
    mkdir -p "$host/root/nix/var/nix/profiles" "$host/root/nix/var/nix/procurator-test"
    ln -sfn "${old[$m]}" "$host/root/nix/var/nix/profiles/system-1-link"
    ln -sfn system-1-link "$host/root/nix/var/nix/profiles/system"
    ln -sfn "${old[$m]}" "$host/root/nix/var/nix/procurator-test/boot-entry"

    # The operator's PROCURATOR_TLS_CERT/KEY exported above are this
    # shell's: the agent has no certificate but the one it enrolls for.
    setsid unshare --mount --propagation private --pid --mount-proc --kill-child -- \
        sh -c "$namespace_script" sh "$host" "${old[$m]}" \
        env -u PROCURATOR_TLS_CERT -u PROCURATOR_TLS_KEY \
        "$bin/procurator-agent" \
        --control-plane "$PROCURATOR_CONTROL_PLANE" \
        --tls-ca "$pki/ca.crt" \
        --join-token "$work/$m.token" \
        --name "$m" \
        --state-dir "$host/state" \
        --substituter "file://$work/cache" \
        --trusted-public-key "$public_key" \
        --intent-public-key "$intent_key" \
        >"$host/agent.log" 2>&1 &
    pids+=("$!")
done

say "waiting for the agents to connect"
# ListAgents through the real grpcurl: its JSON is the protocol's own.
list_agents() {
    grpcurl -cacert "$pki/ca.crt" -cert "$pki/operator-admin.crt" -key "$pki/operator-admin.key" \
        -import-path "$repo/proto/proto" -proto procurator/v1/deployment.proto \
        -d '{}' "$addr" procurator.v1.DeploymentService/ListAgents 2>/dev/null
}
connected=0
for _ in $(seq 1 300); do
    connected=$(list_agents | grep -c '"connected": true' || true)
    ((connected >= ${#machines[@]})) && break
    sleep 0.2
done
"$ctl_bin" status
((connected >= ${#machines[@]})) || echo "local-fleet: only $connected agents connected; deploying anyway"

say "deployment.json: nix eval --json .#blueprintJSON + the closures + a commit id"
commit=$(git -C "$repo" rev-parse HEAD 2>/dev/null || date +%s%N | sha1sum | cut -c1-40)
{
    printf '{\n  "gitCommit": "%s",\n  "blueprint": %s,\n  "closures": {' "$commit" "$(nix eval --json "path:$flake#blueprintJSON")"
    sep=
    for m in "${machines[@]}"; do
        printf '%s\n    "%s": "%s"' "$sep" "$m" "${new[$m]}"
        sep=,
    done
    printf '\n  }\n}\n'
} >"$work/deployment.json"
"$ctl_bin" sign --intent-key "$work/intent.secret" "$work/deployment.json"
"$ctl_bin" validate --intent-public-key "$intent_key" "$work/deployment.json"

say "procurator-ctl submit"
submitted=$("$ctl_bin" submit --output json "$work/deployment.json")
echo "$submitted"
id=$(sed -n 's/.*"deploymentId" *: *"\([^"]*\)".*/\1/p' <<<"$submitted")
[[ -n $id ]] || { echo "local-fleet: no deployment id in the answer" >&2; exit 1; }

say "procurator-ctl watch $id"
watch_status=0
"$ctl_bin" watch "$id" || watch_status=$?

say "procurator-ctl status"
"$ctl_bin" status

say "what each host runs now"
for m in "${machines[@]}"; do
    host="$work/hosts/$m"
    printf '%-16s current-system %s\n' "$m" "$(readlink "$host/run/current-system")"
    printf '%-16s system profile %s -> %s\n' "" "$(readlink "$host/root/nix/var/nix/profiles/system")" \
        "$(readlink "$host/root/nix/var/nix/profiles/$(readlink "$host/root/nix/var/nix/profiles/system")")"
    printf '%-16s boot entry     %s\n' "" "$(readlink "$host/root/nix/var/nix/procurator-test/boot-entry")"
done

case $watch_status in
    0) say "deployment $id succeeded" ;;
    3)
        if [[ -n $broken ]]; then
            say "deployment $id did not succeed, as expected: the health check of $broken was made to fail"
        else
            say "deployment $id did not succeed (see above)"
        fi
        ;;
    *) say "procurator-ctl watch failed (exit $watch_status)" ;;
esac
if [[ -n $broken ]] && ((watch_status == 3)); then
    # The rollback is the point of the demo: it happened.
    watch_status=0
fi
if ((stay && watch_status == 0)); then
    say "the fleet stays up: in any shell, point procurator-ctl at it with"
    echo "  . $current/env"
    echo "  procurator-ctl status"
    echo "(or: $(cat "$work/env"))"
    echo "and stop it with: scripts/local-fleet.sh --stop"
fi
exit "$watch_status"
