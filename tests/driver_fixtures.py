"""Fixtures shared by the self-tests of tests/driver (test_driver_rings.py and
test_driver_frontend.py).

Not a test module (no test_ prefix: pytest collects nothing here); a test module
that uses the mem fixture imports it from here.
"""

from __future__ import annotations

import pytest

try:
    from tests.driver.guestmem import GuestMemory
except ImportError:   # rootdir not on sys.path: tests/ itself is
    from driver.guestmem import GuestMemory


@pytest.fixture
def mem():
    m = GuestMemory(4 << 20)
    yield m
    m.close()
