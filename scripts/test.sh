#!/usr/bin/env bash
# The test command of the README and of CI: set up .venv if needed, then run one tier of the suite.
#   bash scripts/test.sh [fast]        the fast tier: in-process tests only (≤ 60 s on 2 cores), two at a time; the
#                                      default
#   bash scripts/test.sh integration   the tests that start processes (entry points, torchrun, DeepSpeed, SIGKILL,
#                                      the pipeline, the bench scripts), two at a time (pytest-xdist)
#   bash scripts/test.sh all           both tiers in one run, two tests at a time (what CI runs)
#   bash scripts/test.sh lint          ruff check . (the rules of ruff.toml)
# Further arguments go to pytest, e.g. `bash scripts/test.sh fast -k losses -x`.
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh || exit 1
tier=fast
case "${1:-}" in
  fast|integration|all) tier=$1; shift ;;
  lint) shift; exec .venv/bin/ruff check . "$@" ;;
esac
# xdist: --dist loadgroup keeps the tests that share a module-scoped fixture (e.g. the pipeline's runs) on one worker
# (tests/conftest.py groups them). Each test process uses one torch thread, each subprocess one OpenMP thread.
case "$tier" in
  fast) args=(-m "not integration" -n 2 --dist loadgroup) ;;
  integration) args=(-m integration -n 2 --dist loadgroup) ;;
  all) args=(-n 2 --dist loadgroup) ;;
esac
start=$SECONDS
.venv/bin/python -m pytest "${args[@]}" --durations=10 "$@"
rc=$?
echo "$tier tier: $((SECONDS - start)) s" >&2
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treated as a failure" >&2
  exit 1
fi
exit "$rc"
