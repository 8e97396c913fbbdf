#!/bin/bash
# SPDX-License-Identifier: MIT
# debian/check-deb.sh QUBLK.DEB: what `make deb` checks in the package it
# built, unpacked with dpkg -x: the binary runs and knows its commands;
# every command has its man page, and every page renders without a groff
# warning; the unit names /usr/sbin/qublk and passes systemd-analyze
# verify (run against the unpacked binary and pages); the udev rules
# import from /usr/sbin/qublk; the completion and the Depends are there.
set -euo pipefail
deb=$1
fail() { echo "FAIL: check-deb: $*" >&2; exit 1; }
R=$(mktemp -d /dev/shm/qublk-deb.XXXXXX)
trap 'rm -rf "$R"' EXIT
dpkg -x "$deb" "$R"

"$R/usr/sbin/qublk" --version | grep -q '^qublk ' || fail "the binary does not run"
cmds=$("$R/usr/sbin/qublk" --help | awk '/^Commands:/ { on = 1; next } on && /^  [a-z]/ { print $1 }')
[ "$(echo "$cmds" | wc -l)" -ge 10 ] || fail "qublk --help lists: $cmds"
for p in qublk.8 qublk.conf.5 $(for c in $cmds; do echo "qublk-$c.8"; done); do
    f=$R/usr/share/man/man${p##*.}/$p.gz
    [ -f "$f" ] || fail "no man page $p"
    warn=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -E UTF-8 -l -Tutf8 -Z "$f" 2>&1 >/dev/null) ||
        fail "man $p: $warn"
    [ -z "$warn" ] || fail "$p: $warn"
done

unit=$R/lib/systemd/system/qublk@.service
grep -qx 'ExecStart=/usr/sbin/qublk service start %i' "$unit" || fail "the unit's ExecStart"
grep -qx 'ExecStop=/usr/sbin/qublk service stop %i' "$unit" || fail "the unit's ExecStop"
if command -v systemd-analyze >/dev/null; then
    mkdir "$R/units"
    sed "s|/usr/sbin/qublk|$R/usr/sbin/qublk|" "$unit" >"$R/units/qublk@.service"
    ln -s qublk@.service "$R/units/qublk@vm.service"
    out=$(MANPATH=$R/usr/share/man systemd-analyze verify "$R/units/qublk@vm.service" 2>&1) ||
        fail "systemd-analyze verify: $out"
    [ -z "$out" ] || fail "systemd-analyze verify: $out"
fi
grep -qx 'IMPORT{program}="/usr/sbin/qublk udev-id %k"' "$R/lib/udev/rules.d/60-qublk.rules" ||
    fail "the udev rules do not import from /usr/sbin/qublk"
[ -f "$R/usr/share/bash-completion/completions/qublk" ] || fail "no bash completion"
bash -n "$R/usr/share/bash-completion/completions/qublk" || fail "the completion does not parse"
dpkg-deb -f "$deb" Depends | grep -q liburing || fail "Depends lacks liburing"
echo "check-deb: $deb: $(echo "$cmds" | wc -w) commands, their pages, unit, rules, completion: OK"
