#!/usr/bin/env bash
# Install everything gactor needs on Debian 12, as root. Idempotent; quick when nothing is to do.
#   env GACTOR_ROOTFS_DIR  where to build the default busybox rootfs (/var/lib/gactor/images/busybox)
#   env GACTOR_BUSYBOX_GLIBC_DIR  where Debian's dynamic busybox is extracted (/var/lib/gactor/busybox-glibc)
#   env PYTHON             interpreter for .venv (default: the first of python3, python3.13,
#                          python3.12, python3.11, ~/.pyenv/shims/python3 that is >= 3.11.4)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOTFS_DIR=${GACTOR_ROOTFS_DIR:-/var/lib/gactor/images/busybox}
VENV=.venv
STAMP=$VENV/.gactor-install-stamp
# gcc + libc6-dev: the server compiles its static garden-init (pid 1 of every container;
# docs/architecture.md says why not Debian's tini or catatonit).
# openssl: the TLS tests make a self-signed certificate with it.
# systemd: the tests check contrib/gactor.service with systemd-analyze verify.
# libseccomp2: the server builds every unprivileged container's seccomp filter with it (ctypes).
# netcat-openbsd: Garden's conformance suite (GATS) runs `nc` on the host for its NetIn spec.
# docker-registry, skopeo, umoci: the image tests run a real registry (distribution 2.8) on
# 127.0.0.1 with a config of their own, feed it with skopeo, and check gactor's unpacked
# layers against umoci's (tests/registry_docker.py); the bench compares pulls with them.
PACKAGES=(busybox-static nftables conntrack socat iperf3 e2fsprogs util-linux iproute2 gcc libc6-dev openssl systemd netcat-openbsd libseccomp2
          docker-registry skopeo umoci)

step() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (gactor manages cgroups, namespaces and nftables)"

# A Python >= 3.11.4: tarfile.data_filter is needed (Debian 12's /usr/bin/python3 is 3.11.2).
py_ok() { "$1" -c 'import sys, tarfile; sys.exit(sys.version_info < (3, 11, 4) or not hasattr(tarfile, "data_filter"))' 2>/dev/null; }
PY=
for cand in ${PYTHON:-} python3 python3.13 python3.12 python3.11 "${HOME:-/root}/.pyenv/shims/python3"; do
    if command -v "$cand" >/dev/null 2>&1 && py_ok "$cand"; then PY=$(command -v "$cand"); break; fi
done
[[ -n $PY ]] || die "no Python >= 3.11.4 found (tried \$PYTHON, python3, python3.1[123], ~/.pyenv/shims/python3); install one (e.g. pyenv install 3.11.7) or set PYTHON=/path/to/python3"
# python3-venv is only needed when that interpreter has no ensurepip (Debian's split packaging).
"$PY" -c 'import ensurepip, venv' 2>/dev/null || PACKAGES+=(python3-venv)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$pkg")
done
if ((${#missing[@]})); then
    step "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # docker-registry's package starts a registry listening on every interface (:5000) from
    # its postinst. A policy-rc.d that refuses every start (exit 101, invoke-rc.d's "action
    # forbidden") stops that for the install; one already present (a container's) is kept.
    policy=/usr/sbin/policy-rc.d
    ours=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# gactor setup.sh: no service starts during this install\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        ours=1
    fi
    trap '[[ -n $ours ]] && rm -f "$policy"' EXIT
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [[ -n $ours ]] && rm -f "$policy"
    trap - EXIT
else
    step "Debian packages present"
fi
# ... and the service stays off for good: masked (never started, by boot or by a package
# upgrade), and stopped in case an earlier install outside this script started it. The tests
# run `docker-registry serve` themselves, on 127.0.0.1 only.
if [[ -e /lib/systemd/system/docker-registry.service && ! -L /etc/systemd/system/docker-registry.service ]]; then
    step "mask docker-registry.service (it would listen on all interfaces)"
    if [[ -d /run/systemd/system ]]; then  # systemd runs: stop it too
        systemctl disable --now docker-registry.service >/dev/null 2>&1 || true
    else  # no systemd (a container): only the links the postinst made
        systemctl disable docker-registry.service >/dev/null 2>&1 || true
    fi
    systemctl mask docker-registry.service >/dev/null 2>&1 || ln -sf /dev/null /etc/systemd/system/docker-registry.service
fi
if [[ -x /etc/init.d/docker-registry ]] && /etc/init.d/docker-registry status >/dev/null 2>&1; then
    /etc/init.d/docker-registry stop >/dev/null 2>&1 || true
fi

if [[ -x $VENV/bin/python ]] && py_ok "$VENV/bin/python"; then
    step "venv $VENV present ($("$VENV/bin/python" -V))"
else
    step "create venv $VENV with $PY ($("$PY" -V))"
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    rm -f "$STAMP"
fi

want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$want" ]]; then
    step "python packages up to date"
else
    step "pip install -e '.[test]'"
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    echo "$want" >"$STAMP"
fi

# The default rootfs follows Docker's busybox image (glibc; gactor/kernel/busybox.py): Debian's
# dynamic busybox, of the installed busybox-static's version. The two packages conflict and the
# static one stays (the server's tar), so the dynamic one is extracted, not installed.
BUSYBOX_GLIBC=${GACTOR_BUSYBOX_GLIBC_DIR:-/var/lib/gactor/busybox-glibc}
export GACTOR_BUSYBOX_GLIBC_DIR=$BUSYBOX_GLIBC
bb_version=$(dpkg-query -W -f='${Version}' busybox-static)
if [[ $(cat "$BUSYBOX_GLIBC/.deb-version" 2>/dev/null) == "$bb_version" ]]; then
    step "Debian busybox $bb_version present in $BUSYBOX_GLIBC"
else
    step "extract Debian's busybox $bb_version to $BUSYBOX_GLIBC"
    tmp=$(mktemp -d)
    get() { (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "busybox=$bb_version"); }
    get || { apt-get update -qq && get; } || die "apt-get download busybox=$bb_version failed"
    rm -rf "$BUSYBOX_GLIBC.new"
    mkdir -p "$(dirname "$BUSYBOX_GLIBC")"
    dpkg-deb -x "$tmp"/busybox_*.deb "$BUSYBOX_GLIBC.new"
    echo "$bb_version" >"$BUSYBOX_GLIBC.new/.deb-version"
    rm -rf "$BUSYBOX_GLIBC" "$tmp"
    mv "$BUSYBOX_GLIBC.new" "$BUSYBOX_GLIBC"
fi

step "$("$VENV/bin/python" -m gactor.kernel.busybox "$ROOTFS_DIR")"
