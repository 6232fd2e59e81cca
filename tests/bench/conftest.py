"""The gate of the speed benchmarks (see speedgate.py); --bench-update is declared in tests/conftest.py."""
import pytest

from speedgate import Gate


@pytest.fixture(scope="session")
def gate(request):
    g = Gate(request.config.getoption("--bench-update"))
    yield g
    if g.update:
        g.write()
