#!/bin/bash
# SPDX-License-Identifier: MIT
# The man pages (man/*.scd, rendered by scdoc) against the binary:
#  - every command of `qublk --help` has its page qublk-CMD(8), and
#    qublk(8) lists exactly those commands;
#  - for every command, the options `qublk CMD --help` names (its usage
#    and its option table) are exactly the options its page lists under
#    OPTIONS, and the exit codes of its "Exit codes:" line are exactly
#    those under EXIT STATUS (-h/--help aside: every command has them);
#  - every option a page lists is one the binary accepts (probed with a
#    bogus option after it, so that nothing runs);
#  - every page renders without a groff warning (lintian's check).
# --help texts that do not name an option the binary accepts are listed
# in HELP_GAPS below (their files are being changed elsewhere); the page
# documents those options all the same.
. "$(dirname "$0")/lib.sh"
[ -x "$QUBLK" ] || skip "$QUBLK not built"
requires scdoc man "$PYTHON"

make -s -C "$TOP_DIR" O="$TMPD/b" man >/dev/null || fail "make man failed"
for f in "$TMPD"/b/man/*; do
    # What lintian runs on every page of a package.
    warn=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -E UTF-8 -l -Tutf8 -Z "$f" 2>&1 >/dev/null) \
        || fail "man $f failed: $warn"
    [ -z "$warn" ] || fail "${f##*/}: groff warnings: $warn"
done

"$PYTHON" - "$QUBLK" "$TOP_DIR/man" <<'EOF' || fail "the man pages and --help disagree (above)"
import re, subprocess, sys

qublk, mandir = sys.argv[1], sys.argv[2]
OPT = r'(?<![\w-])(--?[A-Za-z0-9][-A-Za-z0-9]*)'
# Options the binary accepts that these --help texts do not name yet
# (src/cli/ublk.c); their pages document them.
HELP_GAPS = {'list': {'-o'}, 'del': {'--number', '-a'}}
errors = []

def run(*args):
    p = subprocess.run([qublk, *args], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr

def help_options(text):
    opts, usage = set(), False
    for line in text.splitlines():
        if line.startswith('Usage:'):
            usage = True
        elif not line.strip():
            usage = False
        if usage:
            opts |= set(re.findall(OPT, line))
        elif re.match(r'^ +-', line):
            head = re.split(r'\s{2,}', line.strip())[0]
            opts |= set(re.findall(OPT, head))
    return opts - {'-h', '--help'}

def help_exit_codes(text):
    m = re.search(r'^Exit (?:codes|status):(.*?)(?:\n\n|\Z)', text, re.M | re.S)
    if not m:
        return None
    return set(re.findall(r'(?:^|[:,;]\s+|\n)(\d+)\s', ':' + m.group(1)))

def sections(scd):
    out, name = {}, None
    for line in scd.splitlines():
        if line.startswith('# '):
            name = line[2:].strip()
            out[name] = []
        elif name:
            out[name].append(line)
    return out

def man_options(sec):
    opts, takes = set(), {}
    for line in sec.get('OPTIONS', []):
        if line.startswith('*-'):
            found = re.findall(r'\*(--?[A-Za-z0-9][-A-Za-z0-9]*)\*', line)
            for o in found:
                takes[o] = bool(re.search(r'\*\s+_', line) or '_' in line.split('*')[-1])
            opts |= set(found)
    return opts - {'-h', '--help'}, takes

def man_exit_codes(sec):
    return {m.group(1) for l in sec.get('EXIT STATUS', []) for m in [re.match(r'^\*(\d+)\*$', l)] if m}

rc, top, _ = run('--help')
cmds = re.findall(r'^  ([a-z][a-z-]*) ', top.split('Commands:')[1], re.M)
if len(cmds) < 10:
    errors.append(f'qublk --help lists {len(cmds)} commands: {cmds}')
main = sections(open(f'{mandir}/qublk.8.scd').read())
listed = [m.group(1) for l in main.get('COMMANDS', []) for m in [re.match(r'^\*([a-z-]+)\*$', l)] if m]
if sorted(listed) != sorted(cmds):
    errors.append(f'qublk(8) COMMANDS {sorted(listed)} != qublk --help {sorted(cmds)}')

for cmd in cmds:
    try:
        scd = open(f'{mandir}/qublk-{cmd}.8.scd').read()
    except OSError as e:
        errors.append(f'{cmd}: no man page: {e}')
        continue
    sec = sections(scd)
    for s in ('NAME', 'SYNOPSIS', 'DESCRIPTION', 'OPTIONS', 'EXIT STATUS', 'SEE ALSO'):
        if s not in sec:
            errors.append(f'qublk-{cmd}(8): no {s} section')
    rc, out, err = run(cmd, '--help')
    if rc != 0 or not out.startswith('Usage:'):
        errors.append(f'{cmd} --help: exit {rc}')
        continue
    h = help_options(out)
    m, takes = man_options(sec)
    gaps = HELP_GAPS.get(cmd, set())
    if h - m:
        errors.append(f'{cmd}: --help names {sorted(h - m)}, the man page does not')
    if m - h - gaps:
        errors.append(f'{cmd}: the man page lists {sorted(m - h - gaps)}, --help does not')
    he, me = help_exit_codes(out), man_exit_codes(sec)
    if he is None:
        errors.append(f'{cmd} --help: no "Exit codes:" line')
    elif he != me:
        errors.append(f'{cmd}: exit codes: --help {sorted(he, key=int)}, man {sorted(me, key=int)}')
    # The binary accepts every documented option: the bogus option after
    # it makes every command stop at its usage error before doing anything.
    for o in sorted(m):
        args = [cmd, o] + (['1'] if takes.get(o) else []) + ['--qublk-bogus-zz']
        rc, out, err = run(*args)
        refused = f"unrecognized option '{o}'" in err or \
            (len(o) == 2 and f"invalid option -- '{o[1]}'" in err)
        if rc == 0 or refused:
            errors.append(f'{cmd}: {o} is in the man page, the binary refuses it: {err.strip()}')
    print(f'{cmd}: {len(m)} options, exit codes {sorted(me, key=int)}')

for e in errors:
    print('MISMATCH:', e)
sys.exit(1 if errors else 0)
EOF
echo "PASS: $TEST_NAME"
