# Shared by the install scripts and the demo (source it): install missing tools with
# apt-get, quietly unless something fails.

# apt_install PKG...: apt-get update + install without recommends; apt's and dpkg's
# progress is shown only when they fail.
apt_install() {
  local log rc=0
  log=$(mktemp -t causeway-apt.XXXXXX)
  echo "==> apt-get install $*"
  {
    apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
  } >"$log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    cat "$log" >&2
    echo "error: apt-get install $* failed (exit $rc, output above)" >&2
  fi
  rm -f "$log"
  return "$rc"
}

# missing_tools CMD:PKG...: prints "CMD:PKG" for each command not on PATH.
missing_tools() {
  local pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || echo "$pair"
  done
}

# ensure_tools CMD:PKG...: installs the package of every missing command. With
# CAUSEWAY_NO_INSTALL=1, or without apt-get or root, installs nothing and fails naming
# each missing command and its package.
ensure_tools() {
  local missing pkgs=() pair
  missing=$(missing_tools "$@")
  [ -z "$missing" ] && return 0
  for pair in $missing; do pkgs+=("${pair#*:}"); done
  if [ "${CAUSEWAY_NO_INSTALL:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt_install "${pkgs[@]}" || return 1
    missing=$(missing_tools "$@")
    [ -z "$missing" ] && return 0
  fi
  for pair in $missing; do
    echo "error: ${pair%%:*} not found on PATH (Debian package ${pair#*:})" >&2
  done
  echo "fix: apt-get install ${pkgs[*]}   (as root; scripts/install-test-deps.sh installs everything the tests need)" >&2
  return 1
}
