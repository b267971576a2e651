import os

import pytest

from tests.integration.harness import Fleet


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path)
    yield f
    try:
        f.stop(timeout_s=20)
    finally:
        f.kill()


def pytest_configure(config):
    # Python imports a compiled module in preference to its source, so after an edit to
    # the hot path the tests would run yesterday's code: refuse, and say what to do.
    if os.environ.get("AGENTVISOR_PURE_PYTHON") != "1":
        from sidecar.compile import stale

        problems = stale()
        if problems:
            raise pytest.UsageError(
                "the compiled hot path does not match its sources:\n  "
                + "\n  ".join(problems)
                + "\nrun `make install` (or `.venv/bin/python -m sidecar.compile`), or set "
                "AGENTVISOR_PURE_PYTHON=1 to test the sources")
