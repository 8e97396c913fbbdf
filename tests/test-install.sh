#!/bin/bash
# SPDX-License-Identifier: MIT
# `make install` / `make uninstall` and what they install:
#  - PREFIX install: exactly the expected files; the installed binary
#    runs; the unit and the rules name it (no @SBINDIR@ left); man finds
#    every page by name; `make uninstall` removes every file and keeps a
#    configuration the user wrote;
#  - DESTDIR install: the files under DESTDIR, the unit naming the final
#    path;
#  - the unit passes `systemd-analyze verify` with no message at all
#    (ExecStart executable, man pages found) and has the settings the
#    crash recovery depends on;
#  - the udev rules: the program they import runs, as udev would run it,
#    and gives the ID_SERIAL their links use;
#  - bash completion: commands, each command's options (the same as its
#    --help), option values, device numbers, service names (-C DIR), and
#    image paths.
# The rules' effect on a live device needs udev (not here, nor in the VM):
# README "Install" describes the manual `udevadm test` check.
. "$(dirname "$0")/lib.sh"
[ -x "$QUBLK" ] || skip "$QUBLK not built"
requires scdoc man
if ! command -v systemd-analyze >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd >/dev/null 2>&1 || true
fi
requires systemd-analyze

mk() { make -s -C "$TOP_DIR" O="$TMPD/b" INSTALL_BIN="$QUBLK" "$@"; }

# ---- PREFIX install
P=$TMPD/usr
mk install PREFIX="$P" SYSCONFDIR="$TMPD/etc" >/dev/null || fail "make install failed"
(cd "$TMPD" && find usr etc | sort) >"$TMPD/files"
pages=$(cd "$TOP_DIR/man" && for f in *.scd; do f=${f%.scd}; echo "usr/share/man/man${f##*.}/$f"; done)
sort >"$TMPD/want" <<EOF
etc
etc/qublk
usr
usr/lib
usr/lib/systemd
usr/lib/systemd/system
usr/lib/systemd/system/qublk@.service
usr/lib/udev
usr/lib/udev/rules.d
usr/lib/udev/rules.d/60-qublk.rules
usr/sbin
usr/sbin/qublk
usr/share
usr/share/bash-completion
usr/share/bash-completion/completions
usr/share/bash-completion/completions/qublk
usr/share/man
usr/share/man/man5
usr/share/man/man8
$pages
EOF
diff -u "$TMPD/want" "$TMPD/files" || fail "make install did not install the expected files"
[ "$(echo "$pages" | wc -l)" -ge 15 ] || fail "only $(echo "$pages" | wc -l) man pages"
"$P/sbin/qublk" --version | grep -q '^qublk ' || fail "the installed binary does not run"
for f in "$P/lib/systemd/system/qublk@.service" "$P/lib/udev/rules.d/60-qublk.rules"; do
    ! grep -v '^#' "$f" | grep -q '@[A-Z]*@' || fail "$f: a @VAR@ is left"
    grep -q "$P/sbin/qublk " "$f" || fail "$f does not name $P/sbin/qublk"
done
for p in qublk qublk-add qublk-service qublk-udev-id qublk.conf; do
    MANPATH=$P/share/man man -w "$p" >/dev/null 2>&1 || fail "man does not find $p"
done

# ---- the unit
U=$TMPD/units
mkdir -p "$U"
cp "$P/lib/systemd/system/qublk@.service" "$U/"
ln -s qublk@.service "$U/qublk@vm.service"
out=$(MANPATH=$P/share/man systemd-analyze verify "$U/qublk@vm.service" 2>&1) ||
    fail "systemd-analyze verify failed: $out"
[ -z "$out" ] || fail "systemd-analyze verify: $out"
unit=$P/lib/systemd/system/qublk@.service
for want in '^Type=notify$' "^ExecStart=$P/sbin/qublk service start %i\$" \
    "^ExecStop=$P/sbin/qublk service stop %i\$" '^Restart=on-failure$' \
    '^RestartPreventExitStatus=2$' '^WantedBy=multi-user.target$'; do
    grep -q "$want" "$unit" || fail "the unit has no line $want"
done
# The check itself catches a broken unit.
sed 's/^Restart=on-failure/Restart=sometimes/' "$unit" >"$U/qublk@.service"
out=$(MANPATH=$P/share/man systemd-analyze verify "$U/qublk@vm.service" 2>&1) || true
[ -n "$out" ] || fail "systemd-analyze verify said nothing of Restart=sometimes"

# ---- the udev rules: run what they import, as udev would (%k: the kernel name)
rules=$P/lib/udev/rules.d/60-qublk.rules
prog=$(sed -n 's/^IMPORT{program}="\(.*\)"$/\1/p' "$rules")
[ -n "$prog" ] || fail "no IMPORT{program} in $rules"
grep -q 'SYMLINK+="disk/by-id/ublk-qublk-$env{ID_SERIAL}"' "$rules" || fail "no by-id link rule"
grep -q 'SYMLINK+="disk/by-id/ublk-qublk-$env{ID_SERIAL}-part%n"' "$rules" || fail "no partition link rule"
grep -q 'OWNER="$env{QUBLK_OWNER_UID}", GROUP="$env{QUBLK_OWNER_GID}", MODE="0600"' "$rules" || fail "no owner rule"
if [ ! -e /dev/ublk-control ]; then
    export QUBLK_RUN_DIR=$TMPD/run
    mkdir -p "$QUBLK_RUN_DIR"
    printf 'id=5\npid=1\ntarget=qcow2\nqueues=1\ndepth=64\nread_only=0\nforce_share=0\ndirect=1\nsize=0\nflags=0\nimage=/var/lib/qublk/vm-1.qcow2\n' \
        >"$QUBLK_RUN_DIR/ublk5"
    for k in ublkb5 ublkb5p1; do
        # shellcheck disable=SC2086 # (word splitting as udev splits it)
        ${prog//%k/$k} >"$TMPD/props" || fail "$prog for $k failed"
        grep -qx 'ID_SERIAL=var-lib-qublk-vm\\x2d1.qcow2' "$TMPD/props" || fail "$k: $(cat "$TMPD/props")"
    done
    unset QUBLK_RUN_DIR
fi
if udevadm verify --help >/dev/null 2>&1; then   # systemd >= 254
    udevadm verify "$rules" || fail "udevadm verify $rules"
fi

# ---- bash completion, against the installed binary
comp() {   # comp WORD... (the last one is being completed): prints COMPREPLY
    COMP_WORDS=("$@")
    COMP_CWORD=$(($# - 1))
    COMPREPLY=()
    _qublk
    printf '%s\n' "${COMPREPLY[@]}" | sort
}
has() { grep -qx -- "$2" <<<"$1" || fail "completing '$3' offers no '$2': $(echo "$1" | tr '\n' ' ')"; }
hasnt() { ! grep -qx -- "$2" <<<"$1" || fail "completing '$3' offers '$2'"; }
PATH=$P/sbin:$PATH
set +u
# shellcheck source=/dev/null
. "$P/share/bash-completion/completions/qublk"
complete -p qublk | grep -q _qublk || fail "no completion registered for qublk"
r=$(comp qublk '')
for c in create info check map convert snapshot add list del recover upgrade features nbd bench \
    service udev-id --help; do
    has "$r" "$c" "qublk"
done
r=$(comp qublk a); [ "$r" = add ] || fail "completing 'qublk a': $r"
# Every command's options: those its --help names.
for c in $(_qublk_commands); do
    want=$("$P/sbin/qublk" "$c" --help | awk '/^Usage:/,/^$/' | grep -oE -- '(^|[[ |])--?[A-Za-z0-9][-A-Za-z0-9]*' |
        sed "s/^[[ |]//" | sort -u || true)
    r=$(comp qublk "$c" -)
    for o in $want; do has "$r" "$o" "qublk $c -"; done
done
r=$(comp qublk add --q); [ "$r" = --queues ] || fail "completing 'qublk add --q': $r"
r=$(comp qublk add --); has "$r" --no-recovery "qublk add --"; has "$r" --cache "qublk add --"
hasnt "$r" --port "qublk add --"
r=$(comp qublk nbd --ex); [ "$r" = --export-name ] || fail "completing 'qublk nbd --ex': $r"
r=$(comp qublk add -t ''); [ "$(echo "$r" | tr '\n' ' ')" = "null qcow2 raw " ] || fail "add -t: $r"
r=$(comp qublk add --cache w); [ "$r" = writeback ] || fail "add --cache w: $r"
r=$(comp qublk check -r ''); [ "$(echo "$r" | tr '\n' ' ')" = "all leaks " ] || fail "check -r: $r"
r=$(comp qublk info --output ''); [ "$(echo "$r" | tr '\n' ' ')" = "human json " ] || fail "info --output: $r"
r=$(comp qublk create -o compa); [ "$r" = compat= ] || fail "create -o compa: $r"
r=$(comp qublk convert -o compa); [ "$r" = compat= ] || fail "convert -o compa: $r"
r=$(comp qublk convert -O ''); [ "$(echo "$r" | tr '\n' ' ')" = "qcow2 raw " ] || fail "convert -O: $r"
r=$(comp qublk convert -F ''); [ "$(echo "$r" | tr '\n' ' ')" = "qcow2 raw " ] || fail "convert -F: $r"
r=$(comp qublk map --output ''); [ "$(echo "$r" | tr '\n' ' ')" = "human json " ] || fail "map --output: $r"
r=$(comp qublk add -q ''); [ -z "$r" ] || fail "add -q offers values: $r"
# Image paths, also after options and their values.
touch "$TMPD/vm1.qcow2" "$TMPD/vm2.raw"
mkdir "$TMPD/vmdir"
r=$(comp qublk add -q 2 --read-only "$TMPD/vm")
for f in vm1.qcow2 vm2.raw vmdir; do has "$r" "$TMPD/$f" "qublk add ... $TMPD/vm"; done
r=$(comp qublk nbd -k "$TMPD/s.sock" "$TMPD/vm1"); [ "$r" = "$TMPD/vm1.qcow2" ] || fail "nbd FILE: $r"
r=$(comp qublk info "$TMPD/vm2"); [ "$r" = "$TMPD/vm2.raw" ] || fail "info FILE: $r"
r=$(comp qublk convert -B "$TMPD/vm1"); [ "$r" = "$TMPD/vm1.qcow2" ] || fail "convert -B FILE: $r"
r=$(comp qublk convert -O qcow2 "$TMPD/vm1.qcow2" "$TMPD/vm2"); [ "$r" = "$TMPD/vm2.raw" ] || fail "convert DST: $r"
r=$(comp qublk list ''); [ -z "$r" ] || fail "list offers: $r"
# Services: the verb, then the names of DIR/*.conf.
r=$(comp qublk service ''); [ "$(echo "$r" | tr '\n' ' ')" = "show start stop " ] || fail "service: $r"
mkdir "$TMPD/conf"
touch "$TMPD/conf/vm-a.conf" "$TMPD/conf/vm-b.conf" "$TMPD/conf/other.txt"
r=$(comp qublk service -C "$TMPD/conf" start vm)
[ "$(echo "$r" | tr '\n' ' ')" = "vm-a vm-b " ] || fail "service start NAME: $r"
r=$(comp qublk service -C "$TMPD/conf" start vm-a ''); [ -z "$r" ] || fail "a third service word: $r"
set -u

# ---- uninstall keeps what the user wrote
echo 'image=/srv/a.img' >"$TMPD/etc/qublk/mine.conf"
mk uninstall PREFIX="$P" SYSCONFDIR="$TMPD/etc" >/dev/null || fail "make uninstall failed"
left=$(cd "$TMPD" && find usr etc -type f)
[ "$left" = etc/qublk/mine.conf ] || fail "make uninstall left: $left"
rm "$TMPD/etc/qublk/mine.conf"
mk uninstall PREFIX="$P" SYSCONFDIR="$TMPD/etc" >/dev/null || fail "a second make uninstall failed"
[ ! -e "$TMPD/etc/qublk" ] || fail "make uninstall kept an empty $TMPD/etc/qublk"

# ---- DESTDIR install: the files under DESTDIR, the paths inside them final
D=$TMPD/dest
mk install DESTDIR="$D" PREFIX=/usr >/dev/null || fail "make install DESTDIR= failed"
[ -x "$D/usr/sbin/qublk" ] && [ -f "$D/usr/share/man/man8/qublk.8" ] || fail "DESTDIR install incomplete"
grep -qx 'ExecStart=/usr/sbin/qublk service start %i' "$D/usr/lib/systemd/system/qublk@.service" ||
    fail "DESTDIR leaked into the unit"
mk uninstall DESTDIR="$D" PREFIX=/usr >/dev/null
[ -z "$(find "$D" -type f)" ] || fail "make uninstall DESTDIR= left files"
echo "PASS: $TEST_NAME"
