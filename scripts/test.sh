#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need, lints (ruff),
# type-checks (mypy) and checks the layer contract (lint-imports) of the code, then runs pytest.
# The tests start real services themselves: PostgreSQL and MariaDB (from Debian packages,
# installed here when missing), an S3-protocol server (moto, from the test extra),
# gradexp servers on loopback, and Debian's headless Chromium (driven by Playwright from
# the test extra; Playwright never downloads a browser here). Screenshots of the sign-in
# pages land in test-artifacts/screenshots/. Extra arguments go to pytest.
#
# pytest runs in three worker processes (pytest-xdist, from the test extra): most tests wait on
# child processes, servers and a browser rather than compute, so three workers finish sooner than
# two even on two cores. --dist loadfile keeps each test file on one worker, so a file's
# module-scoped servers start once; each worker starts the session services it needs itself
# (throwaway instances on free ports, tests/services.py).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need+=(postgresql)
command -v mariadbd >/dev/null 2>&1 || [ -x /usr/sbin/mariadbd ] || need+=(mariadb-server)
[ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing ${need[*]} for the tests" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "tests need: ${need[*]} (apt-get install them, or the tests that use them fail in CI and skip elsewhere)" >&2
  fi
fi

python -m pip install -q -e '.[test]'
# Lint and type-check first: seconds, where the suite takes minutes (mypy keeps a cache in
# .mypy_cache; a cold run reads torch's hints and takes about a minute).
python -m ruff check gradexp tests benchmarks examples
python -m mypy gradexp
lint-imports
exec python -m pytest -n 3 --dist loadfile "$@"
