"""Validates the e2e harness itself against DPDK's reference vhost-user backend.

dpdk-testpmd (net_vhost + net_tap, io forwarding) runs inside a fresh network
namespace; the guest gets 198.18.0.2/24, pings the TAP side (198.18.0.1), downloads
a >= 20 MB random file over HTTP and checks its sha256 inside the guest.
If these fail, the harness (or the machine) is broken, not vhostd.
"""

from __future__ import annotations

import os
import sys

import pytest

import guest as g

pytestmark = pytest.mark.reference

TAP = "vhdref0"


@pytest.fixture(scope="module")
def testpmd(e2e_host):
    if g.ensure_apt_packages({"dpdk-testpmd": "dpdk-dev"}):
        pytest.skip("dpdk-testpmd not found and could not be installed (dpdk-dev)")
    return "dpdk-testpmd"


def _report(result: g.GuestResult, record_property, label: str) -> None:
    secs = result.value("VHOSTD-DOWNLOAD-SECONDS")
    mbps = result.value("VHOSTD-DOWNLOAD-MBPS")
    nbytes = result.value("VHOSTD-DOWNLOAD-BYTES")
    record_property(f"{label}_download_seconds", secs)
    record_property(f"{label}_download_mbps", mbps)
    record_property(f"{label}_guest_run_seconds", f"{result.elapsed:.1f}")
    print(f"\n[e2e] {label}: {nbytes} bytes in {secs}s = {mbps} Mbit/s "
          f"(guest run {result.elapsed:.1f}s, accel {g.default_accel()})", file=sys.stderr)


@pytest.mark.parametrize("variant", [
    pytest.param({}, id="split"),
    pytest.param({"device_opts": ["packed=on", "mrg_rxbuf=off"]}, id="packed-nomrg"),
    pytest.param({"server": True, "queues": 2, "smp": 2}, id="qemu-server-mq2"),
])
def test_reference_dpdk_ping_download(guest_image, netns, sock_dir, http_server,
                                      testpmd, record_property, variant, request):
    ns = g.NetNS(netns)
    sock = os.path.join(sock_dir, "ref.sock")
    variant = dict(variant)
    qemu_server = variant.get("server", False)
    queues = variant.get("queues", 1)

    backend = g.dpdk_reference_backend(ns, sock, TAP, queues=queues)
    if qemu_server:  # QEMU listens, testpmd connects
        i = backend.argv.index("--vdev") + 1
        backend.argv[i] += ",client=1"
    qemu = None
    try:
        if qemu_server:
            # the guest script is only known once the server is up: the HTTP
            # server needs the TAP address, which needs testpmd, which needs QEMU.
            # So the guest waits (ping loop) and the file is prepared upfront.
            srv = g.HttpFileServer(netns)
            srv.generate()
            script = g.net_test_script(srv.url, srv.sha256, srv.size)
            qemu = g.Qemu(guest_image, sock, test_script=script, **variant).start()
            g.wait_for_socket(sock, timeout=20)
            backend.start()
            ns.configure_tap(TAP, proc=backend)
            srv.start()
            try:
                result = qemu.wait(timeout=90)
            finally:
                srv.cleanup()
        else:
            backend.start()
            g.wait_for_socket(sock, proc=backend)
            ns.configure_tap(TAP, proc=backend)
            srv = http_server()
            script = g.net_test_script(srv.url, srv.sha256, srv.size)
            qemu = g.Qemu(guest_image, sock, test_script=script, **variant).start()
            result = qemu.wait(timeout=90)

        context = backend.describe(30)
        if not result.ok:
            context += "\n" + ns.diagnostics(TAP)
        result.assert_ok(context)
        assert result.value("VHOSTD-SHA256") == srv.sha256, result.describe() + "\n" + context
        assert int(result.value("VHOSTD-DOWNLOAD-BYTES") or 0) >= 20 * 1024 * 1024
        assert backend.alive(), "testpmd died during the run\n" + context
        _report(result, record_property, f"dpdk-{request.node.callspec.id}")
    finally:
        if qemu is not None:
            qemu.cleanup()
        backend.stop()
        backend.cleanup()
