# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/apt-mirror.sh: where this machine's Debian mirror is, for the
# private apt states that fetch packages of other suites (the guest
# kernels: tests/vm/setup.sh; kublk's sources: bench/setup-kublk.sh).
# Sourced.  The mirror is read from the machine's own apt configuration,
# never written into the repository.

DEB_SOURCES=${DEB_SOURCES:-/etc/apt/sources.list.d/debian.sources}

# mirror_uris: the URIs of the stanza of $DEB_SOURCES that carries the
# plain "bookworm" suite (not -security); the same mirror serves the other
# suites.  Prints them, or says why not on stderr and returns 1.
mirror_uris() {
    local uris
    [ -r "$DEB_SOURCES" ] || { echo "$DEB_SOURCES not found: cannot tell the apt mirror" >&2; return 1; }
    uris=$(awk '
        /^[[:space:]]*$/ { if (s ~ /(^| )bookworm( |$)/ && u != "") print u; u = ""; s = ""; next }
        /^URIs:/   { sub(/^URIs:[[:space:]]*/, ""); u = $0 }
        /^Suites:/ { sub(/^Suites:[[:space:]]*/, ""); s = $0 }
        END { if (s ~ /(^| )bookworm( |$)/ && u != "") print u }' "$DEB_SOURCES" | head -n 1)
    [ -n "$uris" ] || { echo "no URIs for suite bookworm in $DEB_SOURCES" >&2; return 1; }
    echo "$uris"
}

# signed_by: the keyring of the first stanza that names one (may be empty).
signed_by() { awk '/^Signed-By:/ { print $2; exit }' "$DEB_SOURCES"; }
