#!/usr/bin/python3
# SPDX-License-Identifier: MIT
"""`qublk check` against `qemu-img check` on a corpus of damaged images.

Usage: check-corpus.py QUBLK WORKDIR [KIND-REGEX] [CONFIG-REGEX]

For every configuration (cluster size, refcount width, compat) a base
image is written by qemu-img/qemu-io (data, a compressed cluster, a
preallocated zero cluster, two L2 tables, an internal snapshot with a
cluster rewritten after it when the refcount width allows).  Every kind of
damage in qcow2_damage.py is applied to a copy, then:
  1. `qublk check` and `qemu-img check` must agree on the exit code and
     on the numbers of corruptions and leaks;
  2. after `qublk check -r all` the image must check clean with both
     tools (qublk's status is that of the check it runs after repairing), and every guest cluster outside the damaged range must read
     as before: compared with `qemu-img compare` against the copy that
     `qemu-img check -r all` repaired when that one is clean, else against
     the undamaged image; the snapshot too, unless the damage was to it;
  3. after `qublk check -r leaks`, both tools must agree again.
Step 2's comparisons with QEMU's repair and of the snapshot, and step 3,
run for the FULL configurations only (the run time of the whole matrix stays modest).
Prints one line per case and ends with "N passed, N failed".
"""
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qcow2_damage as D  # noqa: E402

CONFIGS = [
    # name, cluster size, refcount bits, compat
    ("c64k-r16", 65536, 16, "1.1"),
    ("c512-r16-v2", 512, 16, "0.10"),
    ("c2m-r16", 2 << 20, 16, "1.1"),
    ("c64k-r1", 65536, 1, "1.1"),
    ("c512-r64", 512, 64, "1.1"),
]

# Configurations that also compare with QEMU's own repair and run -r leaks.
FULL = ("c64k-r16", "c512-r64")
JOBS = int(os.environ.get("QUBLK_CHECK_JOBS", "3"))

QUBLK = sys.argv[1]
WORK = sys.argv[2]
KIND_RE = re.compile(sys.argv[3] if len(sys.argv) > 3 else "")
CONF_RE = re.compile(sys.argv[4] if len(sys.argv) > 4 else "")
passed = failed = 0


def run(*cmd, check=False):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and p.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(cmd), p.returncode, p.stderr[-500:]))
    return p


def check_json(tool, img):
    if tool == "qemu":
        p = run("qemu-img", "check", "--output=json", img)
    else:
        p = run(QUBLK, "check", "--output", "json", img)
    if re.search(r"AddressSanitizer|runtime error:|LeakSanitizer", p.stderr):
        raise RuntimeError("%s check crashed: %s" % (tool, p.stderr[-2000:]))
    try:
        j = json.loads(p.stdout) if p.stdout.strip() else {}
    except ValueError:
        j = {}
    return p.returncode, j, p.stderr


def summary(rc, j):
    return "exit %d, %d corruptions, %d leaks" % (rc, j.get("corruptions", 0), j.get("leaks", 0))


def agree(img):
    """Both tools on @img: None if they agree, else the disagreement."""
    rq, jq, eq = check_json("qublk", img)
    re_, je, ee = check_json("qemu", img)
    same = rq == re_ and all(jq.get(k, 0) == je.get(k, 0) for k in ("corruptions", "leaks"))
    if same and rq in (0, 2, 3):
        same = jq.get("image-end-offset") == je.get("image-end-offset")
    if same:
        return None, rq
    return ("qublk: %s; qemu-img: %s\n      qublk stderr: %s\n      qemu stderr: %s" %
            (summary(rq, jq), summary(re_, je), eq.strip()[-600:], ee.strip()[-600:])), rq


def make_base(path, cs, rb, compat):
    span = cs * cs // 8
    size = max(2 * span, 16 << 20)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        "cluster_size=%d,refcount_bits=%d,compat=%s" % (cs, rb, compat), path, str(size), check=True)
    ops = ["write -P 0x11 0 %d" % cs, "write -P 0x22 %d %d" % (cs, cs),
           "write -P 0x33 %d %d" % (2 * cs, cs), "write -P 0x44 %d %d" % (3 * cs, cs),
           "write -c -P 0x55 %d %d" % (4 * cs, cs), "write -P 0x66 %d %d" % (5 * cs, cs),
           "write -P 0x67 %d %d" % (span, cs), "write -P 0x68 %d %d" % (span + cs, cs)]
    if compat != "0.10":
        ops.append("write -z %d %d" % (5 * cs, cs))
    args = ["qemu-io", "-f", "qcow2"]
    for o in ops:
        args += ["-c", o]
    run(*args, path, check=True)
    if rb > 1:
        run("qemu-img", "snapshot", "-c", "s1", path, check=True)
        run("qemu-io", "-f", "qcow2", "-c", "write -P 0x77 %d %d" % (cs, cs), path, check=True)
    rc, _, err = check_json("qemu", path)
    if rc != 0:
        raise RuntimeError("base image %s does not check clean: %s" % (path, err))


def to_raw(img, raw, snapshot=None):
    args = ["qemu-img", "convert", "-f", "qcow2", "-O", "raw"]
    if snapshot:
        args += ["-l", "snapshot.name=" + snapshot]
    p = run(*args, img, raw)
    return p.returncode == 0


def data_segments(path):
    """Data extents of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    out = []
    with open(path, "rb") as f:
        fd, end, off = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while off < end:
            try:
                off = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, off, os.SEEK_HOLE)
            out.append((off, hole))
            off = hole
    return out


def same_data(a, b, rng):
    """Raw files @a and @b hold the same bytes outside @rng (start, len)."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    regions = sorted(data_segments(a) + data_segments(b))
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in regions:
            for off in range(start, end, 1 << 20):
                n = min(1 << 20, end - off)
                x, y = bytearray(os.pread(fa.fileno(), n, off)), bytearray(os.pread(fb.fileno(), n, off))
                x += bytes(n - len(x))
                y += bytes(n - len(y))
                if rng:
                    lo, hi = max(off, rng[0]), min(off + n, rng[0] + rng[1])
                    if lo < hi:
                        x[lo - off:hi - off] = bytes(hi - lo)
                        y[lo - off:hi - off] = bytes(hi - lo)
                if x != y:
                    return False
    return True


def has_snapshot(img):
    p = run("qemu-img", "snapshot", "-l", img)
    return p.returncode == 0 and " s1 " in p.stdout


def one_case(conf, base, kind, fn, pristine_raw, pristine_snap_raw, full):
    """Returns (name, error lines) or None when the kind does not apply."""
    name = "%s/%s" % (conf, kind)
    wd = os.path.join(WORK, "%s-%s" % (conf, kind))
    os.mkdir(wd)
    try:
        return _one_case(wd, name, base, kind, fn, pristine_raw, pristine_snap_raw, full)
    finally:
        shutil.rmtree(wd)


def _one_case(WORK, name, base, kind, fn, pristine_raw, pristine_snap_raw, full):
    d = os.path.join(WORK, "dmg.qcow2")
    shutil.copy(base, d)
    img = D.Img(d)
    try:
        rng = fn(img)
    except D.Skip:
        img.close()
        return None
    img.close()
    errors = []
    diff, rc = agree(d)
    if diff:
        errors.append("damaged image: " + diff)
    if rc in (2, 3) and not diff:
        # -r all: clean afterwards for both tools, data kept.
        a = os.path.join(WORK, "ours.qcow2")
        shutil.copy(d, a)
        # Its exit status is that of its own check after the repair.
        p = run(QUBLK, "check", "-r", "all", a)
        if p.returncode != 0:
            errors.append("qublk check -r all: exit %d: %s" % (p.returncode, p.stderr.strip()[-800:]))
        rc2, _, err2 = check_json("qemu", a)
        if rc2 != 0:
            errors.append("after qublk -r all, qemu-img check: exit %d: %s" % (rc2, err2.strip()[-800:]))
        ref = pristine_raw
        if full:
            q = os.path.join(WORK, "qemu.qcow2")
            shutil.copy(d, q)
            run("qemu-img", "check", "-r", "all", q)
            ref = os.path.join(WORK, "ref.raw")
            if run("qemu-img", "check", q).returncode != 0 or not to_raw(q, ref):
                ref = pristine_raw
        ours = os.path.join(WORK, "ours.raw")
        if rng and not to_raw(a, ours):
            # The damaged range may hold garbage that does not even
            # decompress; it is excluded from the comparison anyway.
            run("qemu-io", "-f", "qcow2", "-c", "write -z %d %d" % rng, a)
        if not to_raw(a, ours):
            errors.append("qemu-img convert of the repaired image failed")
        elif not same_data(ours, ref, rng):
            errors.append("guest data outside the damaged range %s changed" % (rng,))
        if pristine_snap_raw and full and not kind.startswith("snap_") and not errors:
            if not has_snapshot(a):
                errors.append("snapshot s1 lost")
            else:
                ours_s = os.path.join(WORK, "ours-s1.raw")
                if not to_raw(a, ours_s, "s1") or not same_data(ours_s, pristine_snap_raw, rng):
                    errors.append("snapshot s1 data outside the damaged range changed")
        # -r leaks: the two tools agree afterwards.
        if not full:
            return name, rc, errors
        shutil.copy(d, a)
        p = run(QUBLK, "check", "-r", "leaks", a)
        diff3, _ = agree(a)
        if diff3:
            errors.append("after qublk -r leaks (exit %d): %s" % (p.returncode, diff3))
    return name, rc, errors


def main():
    global passed, failed
    kinds = sorted(k for k in D.KINDS if KIND_RE.search(k))
    for conf, cs, rb, compat in CONFIGS:
        if not CONF_RE.search(conf):
            continue
        base = os.path.join(WORK, "base-%s.qcow2" % conf)
        make_base(base, cs, rb, compat)
        pristine = os.path.join(WORK, "base-%s.raw" % conf)
        to_raw(base, pristine)
        snap = None
        if rb > 1:
            snap = os.path.join(WORK, "base-%s-s1.raw" % conf)
            to_raw(base, snap, "s1")
        full = conf in FULL
        with concurrent.futures.ThreadPoolExecutor(JOBS) as ex:
            for r in ex.map(lambda k: one_case(conf, base, k, D.KINDS[k], pristine, snap, full),
                            kinds):
                if r is None:
                    continue
                name, rc, errors = r
                if errors:
                    failed += 1
                    print("FAIL %s (exit %d)" % (name, rc))
                    for e in errors:
                        print("    " + e)
                else:
                    passed += 1
                    print("ok   %-34s exit %d" % (name, rc))
                sys.stdout.flush()
        for f in os.listdir(WORK):
            if f.endswith(".raw") or f.endswith(".qcow2"):
                os.unlink(os.path.join(WORK, f))
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
