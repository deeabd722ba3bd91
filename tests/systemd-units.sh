#!/usr/bin/env bash
# Offline checks of everything in systemd/: the units, the sysusers.d and the tmpfiles.d file.
# Needs no running systemd (PID 1 here is not systemd) and changes nothing on the host: all work
# happens in a throw-away root under $TMPDIR.
#
#   tests/systemd-units.sh            # verify + security summary; exit 1 on any finding
#   VERBOSE=1 tests/systemd-units.sh  # also print the full `systemd-analyze security` table
#   KILN_MAX_EXPOSURE=5.0 tests/...   # accept a higher exposure (justify it in kilnd.service)
#
# What the tools do on systemd 252 (Debian 12), measured, and why the script is shaped this way:
# - `systemd-analyze verify FILE` checks ExecStart= binaries on the *host*: before `make install`
#   it fails with "Command /usr/local/bin/kilnd is not executable". With --root=DIR it resolves
#   units and ExecStart= paths inside DIR, but then needs the distro's own units there too
#   (otherwise "Unit sysinit.target not found"). So: copy /usr/lib/systemd/system into a temp
#   root, install our files where `make install` puts them (/etc/systemd/system,
#   /usr/lib/sysusers.d, /usr/lib/tmpfiles.d), and stub every Exec*= binary.
# - verify exits 0 on unknown keys and unparsable values ("Unknown key 'X' ..., ignoring"):
#   any output that names one of our files is therefore a failure.
# - --man=no: kiln ships no man pages; verify would otherwise look for any man: reference.
# - systemd-sysusers has --dry-run (syntax + what it would do) and --root; systemd-tmpfiles has
#   --root but no --dry-run in 252. With --root, a config given by name (kiln.conf) is looked up
#   in the root's sysusers.d/tmpfiles.d, which is what the installed layout needs anyway.
# - `systemd-analyze security --offline=yes --threshold=N` exits non-zero when the exposure
#   (0-100 internally, printed as 0.0-10.0) is above N.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
units_dir="$repo/systemd"
# Measured on systemd 252: 4.1. Raising it is a reviewed decision, not a test fix.
max_exposure=${KILN_MAX_EXPOSURE:-4.1}

failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }
pass() { echo "ok:   $*"; }

for tool in systemd-analyze systemd-sysusers systemd-tmpfiles; do
    if ! command -v "$tool" >/dev/null; then
        # Honest gating (STYLE.md 14): skip with a reason locally, fail under CI.
        if [[ "${CI:-}" == "true" ]]; then
            echo "FAIL: $tool not found (run scripts/setup)" >&2
            exit 1
        fi
        echo "SKIP: $tool not found (run scripts/setup)"
        exit 0
    fi
done
echo "using $(systemd-analyze --version | head -n1)"

root=$(mktemp -d "${TMPDIR:-/tmp}/kiln-systemd-units.XXXXXX")
trap 'rm -rf -- "$root"' EXIT

# --- 1. install into the temp root, as `make install` lays it out ------------------------------
mkdir -p "$root/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
install -D -m 0644 "$units_dir/kilnd.service" "$root/etc/systemd/system/kilnd.service"
install -D -m 0644 "$units_dir/kilnd.socket" "$root/etc/systemd/system/kilnd.socket"
install -D -m 0644 "$units_dir/kiln.sysusers.conf" "$root/usr/lib/sysusers.d/kiln.conf"
install -D -m 0644 "$units_dir/kiln.tmpfiles.conf" "$root/usr/lib/tmpfiles.d/kiln.conf"

# Stub every binary an Exec*= line names (prefixes like "-", "@", "+", "!" stripped), so that
# verify checks the real paths the units use rather than a list kept here by hand.
mapfile -t exec_paths < <(
    sed -n 's/^Exec[A-Za-z]*=[-@:+!]*\([^ ]*\).*/\1/p' "$units_dir"/kilnd.service "$units_dir"/kilnd.socket | sort -u
)
if [[ ${#exec_paths[@]} -eq 0 ]]; then
    fail "no Exec*= line found in kilnd.service"
fi
for path in "${exec_paths[@]}"; do
    [[ -n "$path" ]] || continue  # "ExecStart=" (reset) lines name no binary
    mkdir -p "$root$(dirname "$path")"
    printf '#!/bin/sh\nexit 0\n' >"$root$path"
    chmod 0755 "$root$path"
done

# --- 2. systemd-analyze verify ------------------------------------------------------------------
verify_out=$(systemd-analyze verify --man=no --generators=no --root="$root" \
    kilnd.socket kilnd.service 2>&1) && verify_rc=0 || verify_rc=$?
own_findings=$(grep -E 'kilnd\.(service|socket)' <<<"$verify_out" || true)
if [[ $verify_rc -ne 0 || -n "$own_findings" ]]; then
    fail "systemd-analyze verify (rc=$verify_rc):"
    sed 's/^/      /' <<<"$verify_out" >&2
else
    pass "systemd-analyze verify kilnd.socket kilnd.service (stubs: ${exec_paths[*]})"
    # Findings about distro units are not ours, but show them.
    [[ -z "$verify_out" ]] || sed 's/^/      note: /' <<<"$verify_out"
fi

# --- 3. sysusers.d ----------------------------------------------------------------------------
dry_out=$(systemd-sysusers --dry-run --root="$root" kiln.conf 2>&1) && dry_rc=0 || dry_rc=$?
if [[ $dry_rc -ne 0 ]] || grep -qE 'ignoring|Unknown|Failed|:[0-9]+:' <<<"$dry_out"; then
    fail "systemd-sysusers --dry-run (rc=$dry_rc):"
    sed 's/^/      /' <<<"$dry_out" >&2
else
    pass "systemd-sysusers --dry-run kiln.sysusers.conf"
fi
# A real run into the empty root proves the groups come out as intended.
if systemd-sysusers --root="$root" kiln.conf >/dev/null 2>&1; then
    for group in kiln kiln-audit; do
        if grep -q "^$group:x:[0-9]*:" "$root/etc/group"; then
            pass "sysusers creates group $group ($(grep "^$group:" "$root/etc/group"))"
        else
            fail "sysusers did not create group $group"
        fi
    done
else
    fail "systemd-sysusers --root failed"
fi

# --- 4. tmpfiles.d ------------------------------------------------------------------------------
tmpfiles_out=$(systemd-tmpfiles --root="$root" --create kiln.conf 2>&1) \
    && tmpfiles_rc=0 || tmpfiles_rc=$?
if [[ $tmpfiles_rc -ne 0 || -n "$tmpfiles_out" ]]; then
    fail "systemd-tmpfiles --create (rc=$tmpfiles_rc):"
    sed 's/^/      /' <<<"$tmpfiles_out" >&2
else
    pass "systemd-tmpfiles --create kiln.tmpfiles.conf"
fi
# Expected: path mode owner group (the brief's layout; kilnd.service relies on it).
while read -r path mode owner group; do
    if [[ ! -d "$root$path" ]]; then
        fail "tmpfiles did not create $path"
        continue
    fi
    got=$(stat -c '%a %U %G' "$root$path")
    if [[ "$got" == "$mode $owner $group" ]]; then
        pass "$path is $got"
    else
        fail "$path is $got, want $mode $owner $group"
    fi
done <<'EOF'
/run/kiln 755 root root
/var/lib/kiln 700 root root
/etc/kiln 755 root root
EOF

# --- 5. cross-file consistency ----------------------------------------------------------------
# Every ReadWritePaths= entry must be created by tmpfiles: a missing one fails the unit at start
# (status=226/NAMESPACE), which no offline tool reports.
for path in $(sed -n 's/^ReadWritePaths=//p' "$units_dir/kilnd.service"); do
    path=${path#-}
    if grep -qE "^d[[:space:]]+$path[[:space:]]" "$units_dir/kiln.tmpfiles.conf"; then
        pass "ReadWritePaths=$path is created by kiln.tmpfiles.conf"
    else
        fail "ReadWritePaths=$path has no 'd' line in kiln.tmpfiles.conf"
    fi
done
socket_path=$(sed -n 's/^ListenStream=//p' "$units_dir/kilnd.socket")
if [[ "$socket_path" == /run/kiln/kilnd.sock ]]; then
    pass "kilnd.socket listens on $socket_path"
else
    fail "kilnd.socket listens on '$socket_path', clients expect /run/kiln/kilnd.sock"
fi

# --- 6. security exposure -----------------------------------------------------------------------
threshold=$(awk -v m="$max_exposure" 'BEGIN { printf "%d", m * 10 + 0.5 }')
security_out=$(systemd-analyze security --offline=yes --no-pager --root="$root" \
    --threshold="$threshold" kilnd.service 2>&1) && security_rc=0 || security_rc=$?
if [[ -n "${VERBOSE:-}" ]]; then
    echo "$security_out"
else
    echo "exposed (✗) items, weight in the last column:"
    grep '^✗' <<<"$security_out" | sed 's/^/      /' || true
fi
overall=$(grep -E 'Overall exposure level' <<<"$security_out" || true)
score=$(sed -n 's/.*: \([0-9.]*\) .*/\1/p' <<<"$overall")
if [[ -z "$score" ]]; then
    fail "systemd-analyze security printed no score:"
    sed 's/^/      /' <<<"$security_out" >&2
elif [[ $security_rc -ne 0 ]]; then
    fail "exposure $score is above $max_exposure: justify the loosening in kilnd.service and raise KILN_MAX_EXPOSURE"
else
    pass "systemd-analyze security --offline=yes kilnd.service: exposure $score (limit $max_exposure)"
fi

echo
if [[ $failures -gt 0 ]]; then
    echo "systemd-units: $failures failure(s)" >&2
    exit 1
fi
echo "systemd-units: all checks passed, kilnd.service exposure ${score}"
