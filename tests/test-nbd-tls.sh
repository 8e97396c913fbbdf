#!/bin/bash
# SPDX-License-Identifier: MIT
# NBD over TLS, against libnbd's tools (nbds+unix URIs) and QEMU's TLS
# client (qemu-img/qemu-io with a tls-creds object).  Keys and
# certificates are made here with certtool and psktool, never committed.
#   x509, --tls=require (the default with credentials): nbdinfo, qemu-io
#     writes, and nbdcopy / qemu-img convert of allocated data read back
#     equal to the image itself; a client trusting another CA fails
#     (qemu-io: libnbd checks nothing over a unix socket);
#     plaintext is refused (nbdinfo, qemu-img, and a raw client that must
#     get NBD_REP_ERR_TLS_REQD for NBD_OPT_GO, STRUCTURED_REPLY and
#     EXTENDED_HEADERS and be dropped after NBD_OPT_EXPORT_NAME); QEMU 10
#     negotiates extended headers over TLS;
#   --tls-verify-peer: a client certificate our CA signed is accepted;
#     none, or one another CA signed, is refused;
#   --tls=on: plaintext and TLS clients both served;
#   PSK: the right key works (libnbd, qemu-img), a wrong key or an unknown
#     identity fails;
#   SIGTERM with an idle TLS client connected and one stalled in the
#     middle of its handshake: exit 0 within 5 s;
#   bad credentials are refused at startup, naming the file.
. "$(dirname "$0")/lib.sh"

requires qemu-img qemu-io nbdinfo nbdcopy certtool psktool "$PYTHON"
[ "$QUBLK_TEST_SERVER" = qublk ] || skip "TLS options are qublk's"
requires_server

C=$TMPD/creds
mkdir -p "$C"/{srv,srv-verify,cli,cli-rogue,cli-cert,cli-badcert,psk,psk-bad}

# A CA, the server's certificate, a client certificate, and a rogue CA
# with a client certificate of its own.
certtool_q() { certtool "$@" >/dev/null 2>&1 || fail "certtool $*"; }
cat >"$C/ca.info" <<'EOF'
cn = qublk test CA
ca
cert_signing_key
expiration_days = 2
EOF
cat >"$C/server.info" <<'EOF'
cn = localhost
dns_name = localhost
ip_address = 127.0.0.1
tls_www_server
encryption_key
signing_key
expiration_days = 2
EOF
cat >"$C/client.info" <<'EOF'
cn = qublk test client
tls_www_client
encryption_key
signing_key
expiration_days = 2
EOF
for ca in ca rogue; do
    certtool_q --generate-privkey --key-type=ecdsa --outfile "$C/$ca-key.pem"
    certtool_q --generate-self-signed --load-privkey "$C/$ca-key.pem" \
        --template "$C/ca.info" --outfile "$C/$ca-cert.pem"
done
sign() { # KEY-OUT CERT-OUT TEMPLATE CA
    certtool_q --generate-privkey --key-type=ecdsa --outfile "$1"
    certtool_q --generate-certificate --load-privkey "$1" --load-ca-certificate "$C/$4-cert.pem" \
        --load-ca-privkey "$C/$4-key.pem" --template "$C/$3.info" --outfile "$2"
}
sign "$C/srv/server-key.pem" "$C/srv/server-cert.pem" server ca
cp "$C/ca-cert.pem" "$C/srv/"
cp "$C/srv/"* "$C/srv-verify/"
cp "$C/ca-cert.pem" "$C/cli/"
cp "$C/rogue-cert.pem" "$C/cli-rogue/ca-cert.pem"
cp "$C/ca-cert.pem" "$C/cli-cert/"
sign "$C/cli-cert/client-key.pem" "$C/cli-cert/client-cert.pem" client ca
cp "$C/ca-cert.pem" "$C/cli-badcert/"
sign "$C/cli-badcert/client-key.pem" "$C/cli-badcert/client-cert.pem" client rogue
psktool -u alice -p "$C/psk/keys.psk" >/dev/null 2>&1 || fail "psktool"
psktool -u alice -p "$C/psk-bad/keys.psk" >/dev/null 2>&1 || fail "psktool"
cmp -s "$C/psk/keys.psk" "$C/psk-bad/keys.psk" && fail "psktool made the same key twice"

IMG=$TMPD/disk.qcow2
mkimg -f qcow2 "$IMG" 64M
# Allocated data with a pattern per region, and holes between.
qio "$IMG" qcow2 <<'EOF'
write -P 0x11 0 4M
write -P 0x22 8M 3M
write -P 0x33 30M 64k
write -z 40M 1M
EOF
qemu-img convert -f qcow2 -O raw "$IMG" "$TMPD/expect.raw"

SOCK=$TMPD/tls.sock
serve() { # ARGS...: qublk nbd on $SOCK
    [ -z "$NBD_PID" ] || fail "serve: a server is already running"
    rm -f "$SOCK"
    NBD_LOG=$TMPD/server.$((++NBD_COUNT)).log
    echo "+ qublk nbd $*" >"$NBD_LOG"
    "$QUBLK" nbd --socket "$SOCK" --shared 8 "$@" "$IMG" >>"$NBD_LOG" 2>&1 &
    NBD_PID=$!
    for _ in $(seq 1 200); do
        [ -S "$SOCK" ] && return 0
        _alive "$NBD_PID" || { cat "$NBD_LOG" >&2; NBD_PID=; fail "server exited: $*"; }
        sleep 0.05
    done
    fail "server did not listen: $*"
}
X509_URI="nbds+unix:///?socket=$SOCK&tls-certificates=$C/cli"
PLAIN_URI="nbd+unix:///?socket=$SOCK"
must_fail() { # WHAT CMD...
    local what=$1; shift
    if "$@" >"$TMPD/mf.out" 2>&1; then
        cat "$TMPD/mf.out" >&2
        fail "$what: succeeded"
    fi
}
qemu_tls() { # TOOL CREDS-OBJECT [ARGS...]: TOOL on the server through QEMU's TLS client
    local tool=$1 obj=$2; shift 2
    "$tool" --object "$obj" --image-opts "$@" \
        "driver=nbd,server.type=unix,server.path=$SOCK,tls-creds=tls0,tls-hostname=localhost"
}

echo "== x509, TLS required"
serve --tls-creds "$C/srv"
[ "$(nbdinfo --size "$X509_URI")" = $((64 << 20)) ] || fail "nbdinfo over TLS: wrong size"
nbdinfo "$X509_URI" | grep -q "with TLS" || fail "nbdinfo did not negotiate TLS"
OBJ="tls-creds-x509,id=tls0,dir=$C/cli,endpoint=client"
qemu_tls qemu-io "$OBJ" -c 'write -P 0x44 16M 1M' -c 'read -P 0x11 1M 64k' >"$TMPD/qio.out" 2>&1 ||
    { cat "$TMPD/qio.out" >&2; fail "qemu-io over TLS"; }
grep -qiE 'fail|error|mismatch' "$TMPD/qio.out" && { cat "$TMPD/qio.out" >&2; fail "qemu-io over TLS"; }
qemu-io -f raw -c 'write -P 0x44 16M 1M' "$TMPD/expect.raw" >/dev/null
# QEMU 10 negotiates extended headers after STARTTLS.
if have_qemu10; then
    qemu_tls "$QEMU10_BIN/qemu-io" "$OBJ" --trace nbd_receive_option_reply \
        -c 'read -P 0x44 16M 1M' -c 'write -P 0x45 20M 64k' -c 'read -P 0x45 20M 64k' \
        >"$TMPD/qio10.out" 2>&1 || { cat "$TMPD/qio10.out" >&2; fail "qemu-io 10 over TLS"; }
    grep -qiE 'fail|error|mismatch' "$TMPD/qio10.out" && { cat "$TMPD/qio10.out" >&2; fail "qemu-io 10 over TLS"; }
    grep -q "option reply 11 (extended headers), type 1 (ack)" "$TMPD/qio10.out" ||
        { cat "$TMPD/qio10.out" >&2; fail "QEMU 10 did not negotiate extended headers over TLS"; }
    qemu-io -f raw -c 'write -P 0x45 20M 64k' "$TMPD/expect.raw" >/dev/null
else
    qemu_versions >/dev/null    # fails under CI=true, warns otherwise
fi
nbdcopy "$X509_URI" "$TMPD/copy1.raw" || fail "nbdcopy over TLS"
cmp "$TMPD/expect.raw" "$TMPD/copy1.raw" || fail "nbdcopy over TLS: data differs"
qemu-img convert --object "$OBJ" --image-opts -O raw \
    "driver=nbd,server.type=unix,server.path=$SOCK,tls-creds=tls0,tls-hostname=localhost" \
    "$TMPD/copy2.raw" 2>"$TMPD/conv.err" ||
    { cat "$TMPD/conv.err" >&2; fail "qemu-img convert over TLS"; }
cmp "$TMPD/expect.raw" "$TMPD/copy2.raw" || fail "qemu-img convert over TLS: data differs"
# A client that trusts another CA refuses us (QEMU checks the chain and
# the name over unix sockets too; libnbd only with a hostname, over TCP).
must_fail "qemu-io trusting another CA" qemu_tls qemu-io \
    "tls-creds-x509,id=tls0,dir=$C/cli-rogue,endpoint=client" -c 'read 0 4k'
grep -qi "certificate" "$TMPD/mf.out" || { cat "$TMPD/mf.out" >&2; fail "qemu-io trusting another CA: not a certificate error"; }
# Plaintext refused.
must_fail "plaintext nbdinfo under --tls=require" nbdinfo --size "$PLAIN_URI"
must_fail "plaintext qemu-img under --tls=require" qemu-img info -f raw "$PLAIN_URI"
cat >"$TMPD/plain.py" <<'PYEOF'
# Without TLS: NBD_OPT_GO must get NBD_REP_ERR_TLS_REQD, STRUCTURED_REPLY
# and EXTENDED_HEADERS too; NBD_OPT_EXPORT_NAME must close the connection.
import socket, struct, sys
def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(sys.argv[1])
    g = recvall(s, 18)
    if struct.unpack(">QQH", g)[2] & 1 == 0:
        sys.exit("not fixed newstyle")
    s.sendall(struct.pack(">I", 3))
    return s
def recvall(s, n):
    b = b""
    while len(b) < n:
        k = s.recv(n - len(b))
        if not k:
            return None
        b += k
    return b
def opt(s, o, data=b""):
    s.sendall(struct.pack(">QII", 0x49484156454f5054, o, len(data)) + data)
    magic, ro, typ, ln = struct.unpack(">QIII", recvall(s, 20))
    recvall(s, ln)
    return typ
s = conn()
for o, data, name in ((7, struct.pack(">IH", 0, 0), "NBD_OPT_GO"), (8, b"", "NBD_OPT_STRUCTURED_REPLY"),
                      (11, b"", "NBD_OPT_EXTENDED_HEADERS"), (3, b"", "NBD_OPT_LIST")):
    t = opt(s, o, data)
    if t != 0x80000005:
        sys.exit("%s without TLS: reply 0x%x, want NBD_REP_ERR_TLS_REQD" % (name, t))
s.sendall(struct.pack(">QII", 0x49484156454f5054, 1, 0))
try:
    if recvall(s, 1) is not None:
        sys.exit("NBD_OPT_EXPORT_NAME without TLS: got data")
except ConnectionResetError:
    pass
print("plaintext refused")
PYEOF
"$PYTHON" "$TMPD/plain.py" "$SOCK" || fail "raw plaintext client"
stop_nbd_server

echo "== x509, --tls-verify-peer"
serve --tls-creds "$C/srv-verify" --tls-verify-peer
[ "$(nbdinfo --size "nbds+unix:///?socket=$SOCK&tls-certificates=$C/cli-cert")" = $((64 << 20)) ] ||
    fail "a client certificate our CA signed is refused"
OBJ="tls-creds-x509,id=tls0,dir=$C/cli-cert,endpoint=client"
qemu_tls qemu-io "$OBJ" -c 'read -P 0x44 16M 1M' >"$TMPD/qio.out" 2>&1 ||
    { cat "$TMPD/qio.out" >&2; fail "qemu-io with a client certificate"; }
must_fail "no client certificate" nbdinfo --size "$X509_URI"
must_fail "a client certificate another CA signed" \
    nbdinfo --size "nbds+unix:///?socket=$SOCK&tls-certificates=$C/cli-badcert"
stop_nbd_server
grep -q "client certificate rejected" "$NBD_LOG" || fail "the rejection is not logged"

echo "== x509, --tls=on"
serve --tls-creds "$C/srv" --tls on
[ "$(nbdinfo --size "$PLAIN_URI")" = $((64 << 20)) ] || fail "--tls=on refuses plaintext"
[ "$(nbdinfo --size "$X509_URI")" = $((64 << 20)) ] || fail "--tls=on refuses TLS"
stop_nbd_server

echo "== PSK"
serve --tls-psk "$C/psk/keys.psk"
PSK_URI="nbds+unix://alice@/?socket=$SOCK&tls-psk-file=$C/psk/keys.psk"
[ "$(nbdinfo --size "$PSK_URI")" = $((64 << 20)) ] || fail "nbdinfo with the right PSK"
nbdcopy "$PSK_URI" "$TMPD/copy3.raw" || fail "nbdcopy with PSK"
cmp "$TMPD/expect.raw" "$TMPD/copy3.raw" || fail "nbdcopy with PSK: data differs"
OBJ="tls-creds-psk,id=tls0,dir=$C/psk,username=alice,endpoint=client"
qemu_tls qemu-io "$OBJ" -c 'read -P 0x22 8M 3M' >"$TMPD/qio.out" 2>&1 ||
    { cat "$TMPD/qio.out" >&2; fail "qemu-io with PSK"; }
grep -qiE 'fail|error|mismatch' "$TMPD/qio.out" && { cat "$TMPD/qio.out" >&2; fail "qemu-io with PSK"; }
must_fail "a wrong PSK" nbdinfo --size "nbds+unix://alice@/?socket=$SOCK&tls-psk-file=$C/psk-bad/keys.psk"
sed 's/^alice:/bob:/' "$C/psk/keys.psk" >"$C/psk-bad/bob.psk"
must_fail "an unknown PSK identity" nbdinfo --size "nbds+unix://bob@/?socket=$SOCK&tls-psk-file=$C/psk-bad/bob.psk"
must_fail "plaintext under PSK" nbdinfo --size "$PLAIN_URI"
stop_nbd_server

echo "== SIGTERM with an idle TLS client and one stalled in the handshake"
serve --tls-creds "$C/srv"
cat >"$TMPD/stall.py" <<'PYEOF'
# STARTTLS acked, then half a ClientHello record and silence.
import socket, struct, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
s.connect(sys.argv[1])
s.recv(18)
s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454f5054, 5, 0))
rep = b""
while len(rep) < 20:
    rep += s.recv(20 - len(rep))
if struct.unpack(">QIII", rep)[2] != 1:
    sys.exit("STARTTLS not acked")
s.sendall(b"\x16\x03\x01\x02\x00\x01")
print("ready", flush=True)
time.sleep(60)
PYEOF
"$PYTHON" "$TMPD/stall.py" "$SOCK" >"$TMPD/stall.out" 2>&1 &
spid=$!
for _ in $(seq 1 100); do grep -q ready "$TMPD/stall.out" && break; sleep 0.1; done
grep -q ready "$TMPD/stall.out" || { cat "$TMPD/stall.out" >&2; fail "stalled handshake client"; }
mkfifo "$TMPD/qio.in"
qemu-io --object "tls-creds-x509,id=tls0,dir=$C/cli,endpoint=client" --image-opts \
    "driver=nbd,server.type=unix,server.path=$SOCK,tls-creds=tls0,tls-hostname=localhost" <"$TMPD/qio.in" >"$TMPD/idle.out" 2>&1 &
qpid=$!
exec 8>"$TMPD/qio.in"
echo 'read -P 0x33 30M 64k' >&8
for _ in $(seq 1 100); do grep -q "read 65536/65536" "$TMPD/idle.out" && break; sleep 0.1; done
grep -q "read 65536/65536" "$TMPD/idle.out" || { cat "$TMPD/idle.out" >&2; fail "idle TLS client did not read"; }
t0=${EPOCHREALTIME/./}
kill -TERM "$NBD_PID"
for _ in $(seq 1 250); do _alive "$NBD_PID" || break; sleep 0.02; done
_alive "$NBD_PID" && fail "server still running 5 s after SIGTERM with an idle TLS client"
rc=0; wait "$NBD_PID" || rc=$?
NBD_PID=
echo "  exited $rc after $(((${EPOCHREALTIME/./} - t0) / 1000)) ms"
[ "$rc" = 0 ] && ! _has_crash_report "$NBD_LOG" || { cat "$NBD_LOG" >&2; fail "exit $rc after SIGTERM"; }
exec 8>&-
kill "$qpid" "$spid" 2>/dev/null || true
wait "$qpid" "$spid" 2>/dev/null || true

echo "== bad credentials at startup"
startup_refused() { # WHAT FILE-NAMED ARGS...
    local what=$1 named=$2 rc=0; shift 2
    timeout 10 "$QUBLK" nbd --socket "$TMPD/bad.sock" "$@" "$IMG" >"$TMPD/bad.out" 2>&1 || rc=$?
    [ "$rc" != 0 ] || fail "$what: served"
    grep -q "$named" "$TMPD/bad.out" || { cat "$TMPD/bad.out" >&2; fail "$what: message does not name $named"; }
}
mkdir "$C/empty" "$C/nocacert"
cp "$C/srv/server-cert.pem" "$C/srv/server-key.pem" "$C/nocacert/"
startup_refused "a directory without certificates" server-cert.pem --tls-creds "$C/empty"
startup_refused "--tls-verify-peer without ca-cert.pem" ca-cert.pem --tls-creds "$C/nocacert" --tls-verify-peer
echo "garbage" >"$C/psk-bad/garbage.psk"
startup_refused "a malformed PSK file" garbage.psk --tls-psk "$C/psk-bad/garbage.psk"
startup_refused "a missing PSK file" missing.psk --tls-psk "$C/missing.psk"
rc=0; "$QUBLK" nbd --socket "$TMPD/bad.sock" --tls require "$IMG" >/dev/null 2>&1 || rc=$?
[ "$rc" = 2 ] || fail "--tls=require without credentials: exit $rc, want 2"

qcheck "$IMG"
echo "PASS: $TEST_NAME"
