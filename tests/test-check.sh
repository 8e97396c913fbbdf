#!/bin/bash
# SPDX-License-Identifier: MIT
# qublk check against qemu-img check (the oracle):
#  - the command line: exit codes (63 for raw, 1 for a usage error or an
#    image that cannot be opened), --output json with qemu-img's fields;
#  - the damage corpus (tests/check-corpus.py, kinds in
#    tests/qcow2_damage.py): the same verdicts and counts as qemu-img check
#    on every damaged image, clean after qublk check -r all with guest data
#    outside the damage unchanged, the same verdicts after -r leaks.
# QUBLK_CHECK_KINDS / QUBLK_CHECK_CONFIGS (regexes) narrow the corpus.
# shellcheck source=tests/lib.sh
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io "$PYTHON"
[ -x "$QUBLK" ] || skip "$QUBLK not built"

expect_rc() {
    local want=$1 what=$2 rc=0; shift 2
    "$@" >"$TMPD/out" 2>"$TMPD/err" || rc=$?
    [ "$rc" = "$want" ] || { cat "$TMPD/err" >&2; fail "$what: exit $rc, expected $want"; }
}

# ---- command line ----
qemu-img create -q -f raw "$TMPD/r.raw" 1M
expect_rc 63 "raw image" "$QUBLK" check "$TMPD/r.raw"
grep -q "does not support checks" "$TMPD/err" || fail "raw: message"
expect_rc 63 "-f raw" "$QUBLK" check -f raw "$TMPD/r.raw"
expect_rc 1 "missing file" "$QUBLK" check "$TMPD/nonexistent.qcow2"
expect_rc 1 "bad -r" "$QUBLK" check -r some "$TMPD/r.raw"
expect_rc 0 "--help" "$QUBLK" check --help

mkimg -f qcow2 "$TMPD/a.qcow2" 64M
qio "$TMPD/a.qcow2" qcow2 <<'Q'
write -P 1 0 1M
write -c -P 2 2M 64k
Q
expect_rc 0 "clean image" "$QUBLK" check -U "$TMPD/a.qcow2"
grep -q "No errors were found on the image." "$TMPD/out" || fail "clean: summary"
want=$(qemu-img check "$TMPD/a.qcow2")
[ "$(cat "$TMPD/out")" = "$want" ] || fail "human output differs from qemu-img's: $(cat "$TMPD/out")"
expect_rc 0 "json" "$QUBLK" check --output json "$TMPD/a.qcow2"
qemu-img check --output=json "$TMPD/a.qcow2" >"$TMPD/q.json"
"$PYTHON" - "$TMPD/out" "$TMPD/q.json" <<'PY' || fail "json output differs from qemu-img's"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
a.pop("filename"); b.pop("filename")
if a != b:
    sys.exit("qublk %s\nqemu  %s" % (a, b))
PY
expect_rc 0 "-p off a terminal" "$QUBLK" check -p "$TMPD/a.qcow2"
grep -q "/100%" "$TMPD/out" && fail "-p printed progress to a pipe"
# Three leaked clusters: -r leaks frees them, the double check is clean.
cp "$TMPD/a.qcow2" "$TMPD/b.qcow2"
"$PYTHON" -c "import sys; sys.path.insert(0, sys.argv[1]); import qcow2_damage as D
i = D.Img(sys.argv[2]); D.leak_tail(i); i.close()" "$TESTS_DIR" "$TMPD/b.qcow2"
expect_rc 3 "leaks" "$QUBLK" check "$TMPD/b.qcow2"
grep -q "3 leaked clusters were found on the image." "$TMPD/out" || fail "leaks: summary"
expect_rc 0 "-r leaks" "$QUBLK" check -r leaks "$TMPD/b.qcow2"
grep -q "The following inconsistencies were found and repaired:" "$TMPD/out" || fail "-r leaks: summary"
grep -q "    3 leaked clusters" "$TMPD/out" || fail "-r leaks: count"
qcheck "$TMPD/b.qcow2"

# ---- the corpus ----
# Under the sanitizers, every kind of damage at the two configurations
# that also exercise -r leaks and QEMU's repair (64 KiB clusters with
# 16-bit refcounts, 512 B with 64-bit): the other three configurations
# run the same code with other constants, on the plain build (CI time).
configs=${QUBLK_CHECK_CONFIGS:-}
case $QUBLK in
    *asan*) [ -n "$configs" ] || configs='^(c64k-r16|c512-r64)$' ;;
esac
"$PYTHON" "$TESTS_DIR/check-corpus.py" "$QUBLK" "$TMPD" "${QUBLK_CHECK_KINDS:-}" \
    "$configs" | tee "$TMPD/corpus.log"
tail -n 1 "$TMPD/corpus.log" | grep -qE '^[0-9]+ passed, 0 failed$' || fail "corpus: $(tail -n 1 "$TMPD/corpus.log")"
n=$(grep -c '^ok ' "$TMPD/corpus.log")
kinds=$(grep '^ok ' "$TMPD/corpus.log" | awk '{print $2}' | cut -d/ -f2 | sort -u | wc -l)
echo "corpus: $n cases, $kinds kinds of damage"
if [ -z "${QUBLK_CHECK_KINDS:-}${QUBLK_CHECK_CONFIGS:-}" ] && [ "$kinds" -lt 40 ]; then
    fail "only $kinds kinds of damage ran"
fi
echo "PASS: $TEST_NAME"
