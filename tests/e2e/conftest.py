"""Fixtures for the QEMU end-to-end tests (see guest.py).

Needs root (network namespaces, TAP devices) and qemu-system-x86_64; missing
Debian packages are installed with apt-get when running as root. Without root or
QEMU the tests are skipped with the reason printed.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import guest as g  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "reference: e2e harness validation against DPDK's reference vhost-user "
        "backend (dpdk-testpmd net_vhost + net_tap)")


def _skip(reason: str):
    print(f"\n[e2e] SKIPPED: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def e2e_host():
    """Root + QEMU + iproute2 present (installing them when possible)."""
    if os.geteuid() != 0:
        _skip("e2e tests need root (network namespaces, TAP devices, apt-get)")
    still = g.ensure_apt_packages({g.QEMU_BIN: "qemu-system-x86", "ip": "iproute2",
                                   "taskset": "util-linux"})
    if g.QEMU_BIN in still:
        _skip(f"{g.QEMU_BIN} not found and could not be installed (qemu-system-x86)")
    if "ip" in still:
        _skip("ip (iproute2) not found and could not be installed")
    return True


@pytest.fixture(scope="session")
def guest_image(e2e_host) -> g.GuestImage:
    """The test guest (kernel + base initramfs), built once and cached on disk."""
    try:
        img = g.build_guest()
    except Exception as e:  # a broken build is a failure, not a skip
        pytest.fail(f"building the guest failed: {e}", pytrace=False)
    print(f"\n[e2e] guest: {img.directory} ({img.stamp})", file=sys.stderr)
    return img


@pytest.fixture
def netns(e2e_host):
    """A fresh network namespace ``vhd-<random>``; yields its name. Everything
    still running inside it is killed at teardown, then it is deleted."""
    ns = g.NetNS().create()
    try:
        yield ns.name
    finally:
        ns.delete()


@pytest.fixture
def sock_dir():
    """A short-path temporary directory for unix sockets (sun_path <= 107 bytes)."""
    d = tempfile.mkdtemp(prefix="vhd-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def http_server(netns):
    """Factory: ``http_server(size=...)`` serves a random file from 198.18.0.1
    inside the test's namespace (call it once the address is configured)."""
    servers: list[g.HttpFileServer] = []

    def start(size: int = g.DEFAULT_FILE_SIZE, port: int = 8080) -> g.HttpFileServer:
        srv = g.HttpFileServer(netns, size=size, port=port)
        servers.append(srv)
        return srv.start()

    try:
        yield start
    finally:
        for srv in servers:
            srv.cleanup()
