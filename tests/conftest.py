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
