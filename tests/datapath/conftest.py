"""Fixtures of the C datapath tests (tests/datapath/harness.py): `make_dev` builds
queue pairs over memfd guest memory and a socketpair standing in for the TAP."""
from tests.datapath.harness import make_dev  # noqa: F401  (the fixture, for every module here)
