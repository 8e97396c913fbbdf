# SPDX-License-Identifier: MIT
# shellcheck shell=bash
# tests/vm/apt-mirror.sh: where this machine's Debian mirror is, and the
# private apt states that fetch packages of other suites from it (the
# guest kernel: tests/vm/setup.sh; kublk's sources: bench/setup-kublk.sh).
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

# private_apt DIR COMMENT SUITE...: an apt state of its own in DIR (the
# host's apt never sees it) whose sources are the main component of each
# SUITE on this machine's mirror; sets the array PRIVATE_APT to the
# apt-get/apt-cache options that use it.  Returns 1 (the reason on
# stderr) when the mirror cannot be told.
private_apt() {
    local dir=$1 comment=$2 uris signed u s
    shift 2
    uris=$(mirror_uris) || return 1
    signed=$(signed_by)
    mkdir -p "$dir/lists/partial" "$dir/archives/partial" "$dir/preferences.d"
    {
        echo "# $comment (private apt state, not the host's)"
        for u in $uris; do
            for s in "$@"; do
                echo "deb [${signed:+signed-by=$signed}] $u $s main"
            done
        done
    } >"$dir/sources.list"
    # shellcheck disable=SC2034  # read by the scripts that source this one
    PRIVATE_APT=(-o "Dir::Etc::SourceList=$dir/sources.list" -o Dir::Etc::SourceParts=/nonexistent
                 -o "Dir::State::Lists=$dir/lists" -o "Dir::Cache=$dir"
                 -o "Dir::Cache::Archives=$dir/archives" -o Dir::Etc::Preferences=/dev/null
                 -o "Dir::Etc::PreferencesParts=$dir/preferences.d" -o APT::Architectures=amd64
                 -o APT::Get::List-Cleanup=0)
}
