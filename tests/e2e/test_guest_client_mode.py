"""End to end, the other way round: QEMU listens (`-chardev socket,server=on,wait=off`)
and vhostd connects to it with --client, retrying until the socket is there. After
the guest powers off (QEMU gone), vhostd goes back to retrying and serves the next
QEMU started on the same path."""
from __future__ import annotations

import os
import signal

import guest as g
from test_guest_vhostd import TAP, Vhostd


def _guest_run(guest_image, sock: str, srv: g.HttpFileServer, daemon: Vhostd, ns: g.NetNS, mac: str):
    script = g.net_test_script(srv.url, srv.sha256, srv.size)
    qemu = g.Qemu(guest_image, sock, test_script=script, server=True, mac=mac).start()
    try:
        result = qemu.wait(timeout=90)
    finally:
        qemu.cleanup()
    context = daemon.describe()
    if not result.ok:
        context += "\n" + ns.diagnostics(TAP)
    result.assert_ok(context)
    assert result.value("VHOSTD-SHA256") == srv.sha256, result.describe() + "\n" + context
    return result


def test_vhostd_client_mode_with_qemu_server_and_reconnect(guest_image, netns, sock_dir):
    ns = g.NetNS(netns)
    sock = os.path.join(sock_dir, "qemu.sock")
    daemon = Vhostd(sock, netns, control=os.path.join(sock_dir, "vhostd.ctl"), extra=("--client",),
                    logdir=sock_dir)
    daemon.start()
    srv = g.HttpFileServer(netns)
    try:
        # the daemon is up before any QEMU: it creates its TAP and waits for the socket
        ns.configure_tap(TAP, timeout=20, proc=daemon)
        srv.generate()
        srv.start()
        _guest_run(guest_image, sock, srv, daemon, ns, "52:54:00:12:34:60")
        assert daemon.alive(), "vhostd exited when QEMU went away\n" + daemon.describe()
        _guest_run(guest_image, sock, srv, daemon, ns, "52:54:00:12:34:61")
        log = daemon.stderr()
        # two full handshakes (a connect to a QEMU that is just exiting may come and go in between)
        # (QEMU 7.2 takes the CONFIGURE_MEM_SLOTS path: one ADD_MEM_REG per region)
        assert log.count("memory region added: gpa 0x0 ") == 2, daemon.describe()
        assert "waiting for" in log, daemon.describe()  # it retried while no QEMU listened
        rc = daemon.stop(signal.SIGTERM, timeout=15)
        assert rc == 0, f"vhostd exited with {rc} on SIGTERM\n{daemon.describe()}"
    finally:
        srv.cleanup()
        daemon.kill()
