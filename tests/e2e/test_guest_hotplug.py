"""End to end: memory hotplug beyond 8 regions with a QEMU guest on vhostd.

vhostd offers CONFIGURE_MEM_SLOTS (GET_MAX_MEM_SLOTS: 512), so QEMU 7.2 tells it
about each plugged DIMM with one ADD_MEM_REG and about each removed one with one
REM_MEM_REG, instead of a whole SET_MEM_TABLE limited to 8 regions (QEMU refuses
a 9th DIMM with a backend that offers only that).

The guest (256 MiB, `slots=32,maxmem=4G`, hot-plugged memory onlined movable)
downloads a file in a loop and prints each round's sha256 and its MemTotal. The
test plugs DIMMS memfd DIMMs of 128 MiB over QMP while it does, checks the
region count in `vhostctl ports` after each plug and the guest's MemTotal, then
unplugs UNPLUG of them (device_del; the guest offlines and ejects; QEMU sends
REM_MEM_REG), checks the count and that vhostd unmapped them and closed their
fds, and lets the guest download on. Every round's sha256 must be right.
A second test resizes a virtio-mem-pci device over QMP under the same traffic.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time

import guest as g
from test_guest_features import vhostctl
from test_guest_migration import Qmp
from test_guest_vhostd import TAP, Vhostd

DIMMS = 12
UNPLUG = 5
DIMM_MB = 128                       # Linux's memory block on x86-64: a DIMM it can online whole
FILE_SIZE = 8 << 20
_ROUND = re.compile(r"VHOSTD-ROUND=(\d+) (\S+) (\d+)")


class EventQmp(Qmp):
    """Qmp that can wait for an event."""

    def wait_event(self, name: str, device: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e["event"] == name and e.get("data", {}).get("device") == device:
                    self.events.remove(e)
                    return e
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {name} for {device} within {timeout} s; events: {self.events}")
            self.sock.settimeout(left)
            try:
                line = self.file.readline()
            except socket.timeout:
                continue
            finally:
                self.sock.settimeout(30.0)
            rep = json.loads(line)
            if "event" in rep:
                self.events.append(rep)


class HotplugQemu(g.Qemu):
    def __init__(self, image, socket_path, *, qmp: str, **kw):
        super().__init__(image, socket_path, extra_args=["-qmp", f"unix:{qmp},server=on,wait=off"],
                         cmdline="memhp_default_state=online_movable", **kw)
        self.qmp_path = qmp

    def command(self, initrd):
        cmd = super().command(initrd)
        i = cmd.index("-m")
        cmd[i + 1] = f"{self.mem_mb}M,slots=32,maxmem=4G"
        return cmd


def script(url: str, stop_url: str) -> str:
    """Waits for the host, then downloads `url` round after round (sha256 and
    MemTotal printed) until `stop_url` answers."""
    return f"""#!/bin/sh
i=0
while [ $i -lt 120 ]; do
  ping -c 1 -W 1 {g.HOST_IP} >/dev/null 2>&1 && break
  i=$((i+1))
done
i=0
while [ $i -lt 400 ]; do
  i=$((i+1))
  if wget -q -O /tmp/p {url}; then s=$(sha256sum /tmp/p | cut -d' ' -f1); else s=wget-failed; fi
  rm -f /tmp/p
  echo "VHOSTD-ROUND=$i $s $(sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo)"
  wget -q -O /dev/null {stop_url} && break
done
"""


def _memfd_maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if "memfd:" in line)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Run:
    """vhostd, the HTTP server and a HotplugQemu downloading in a loop; what the
    tests read from them."""

    def __init__(self, guest_image, netns: str, sock_dir: str, http_server, extra_args=()):
        self.control = os.path.join(sock_dir, "vhostd.ctl")
        self.d = Vhostd(os.path.join(sock_dir, "vhostd.sock"), netns, control=self.control, logdir=sock_dir)
        self.d.start()
        self.q = None
        try:
            g.wait_for_socket(self.d.socket_path, timeout=30, proc=self.d)
            g.NetNS(netns).configure_tap(TAP, timeout=20, proc=self.d)
            self.srv = http_server(size=FILE_SIZE)
            qmp_path = os.path.join(sock_dir, "qmp.sock")
            self.q = HotplugQemu(guest_image, self.d.socket_path, qmp=qmp_path,
                                 test_script=script(self.srv.url, f"http://{g.HOST_IP}:{self.srv.port}/stop"))
            self.q.extra_args += list(extra_args)
            self.q.start()
            self.qmp = EventQmp(qmp_path)
        except BaseException:
            self.close()
            raise

    def context(self) -> str:
        return self.d.describe() + "\n--- guest console ---\n" + g.tail(self.q.log, 30)

    def regions(self) -> int:
        return vhostctl(self.control, "ports")[0]["frontend"]["memory_regions"]

    def rounds(self) -> dict[int, tuple[str, int]]:
        """round -> (sha256, guest MemTotal in KiB)"""
        return {int(n): (sha, int(m)) for n, sha, m in _ROUND.findall(self.q.log)}

    def wait_rounds(self, n: int, timeout: float = 120) -> int:
        """n more rounds than now; returns the last one's number."""
        want = max(self.rounds(), default=0) + n
        # the whole line: the console may show its beginning first
        assert self.q.wait_for(rf"VHOSTD-ROUND={want} \S+ \d+\s", timeout), f"no round {want}\n" + self.context()
        return want

    def finish(self) -> dict[int, tuple[str, int]]:
        """Stops the guest's loop; every round's sha256 must be right."""
        (self.srv.directory / "stop").write_text("stop\n")
        res = self.q.wait(timeout=120)
        got = self.rounds()
        bad = {n: sha for n, (sha, _) in got.items() if sha != self.srv.sha256}
        assert res.ok, res.describe() + "\n" + self.context()
        assert not bad and len(got) >= 5, f"{bad}\n{self.context()}"
        self.qmp.close()
        return got

    def close(self) -> None:
        if self.q is not None:
            self.q.kill()
            self.q.cleanup()
        self.d.kill()


def test_dimm_hotplug_beyond_eight_regions_and_unplug(guest_image, netns, sock_dir, http_server):
    run = Run(guest_image, netns, sock_dir, http_server)
    try:
        qmp, d, context, regions, rounds = run.qmp, run.d, run.context, run.regions, run.rounds
        run.wait_rounds(1, timeout=180)
        assert regions() == 1, context()
        pid = d.pid
        fds0, maps0 = _fds(pid), _memfd_maps(pid)
        mem0 = rounds()[max(rounds())][1]

        plug_s = []
        for i in range(DIMMS):
            t0 = time.monotonic()
            qmp.cmd("object-add", **{"qom-type": "memory-backend-memfd", "id": f"m{i}",
                                     "size": DIMM_MB << 20, "share": True})
            qmp.cmd("device_add", driver="pc-dimm", id=f"dimm{i}", memdev=f"m{i}")
            plug_s.append(time.monotonic() - t0)
            assert regions() == i + 2, context()
        last = run.wait_rounds(2)
        mem_plugged = rounds()[last][1]
        print(f"\n[e2e] hotplug: {DIMMS} DIMMs of {DIMM_MB} MiB plugged, vhostd regions {regions()}, "
              f"plug {min(plug_s) * 1000:.0f}-{max(plug_s) * 1000:.0f} ms each; guest MemTotal "
              f"{mem0 >> 10} -> {mem_plugged >> 10} MiB; vhostd fds {fds0} -> {_fds(pid)}, "
              f"memfd mappings {maps0} -> {_memfd_maps(pid)}", file=sys.stderr)
        assert mem_plugged - mem0 == DIMMS * DIMM_MB << 10, context()   # the guest onlined them all
        assert _memfd_maps(pid) == maps0 + DIMMS and _fds(pid) == fds0 + DIMMS

        unplug_s = []
        for i in range(UNPLUG):
            t0 = time.monotonic()
            qmp.cmd("device_del", id=f"dimm{i}")
            qmp.wait_event("DEVICE_DELETED", f"dimm{i}", timeout=60)
            qmp.cmd("object-del", id=f"m{i}")
            unplug_s.append(time.monotonic() - t0)
            assert regions() == DIMMS + 1 - (i + 1), context()
        last = run.wait_rounds(2)
        mem_after = rounds()[last][1]
        fds1, maps1 = _fds(pid), _memfd_maps(pid)
        print(f"[e2e] hotplug: {UNPLUG} DIMMs unplugged in {min(unplug_s):.1f}-{max(unplug_s):.1f} s each "
              f"(guest offlines, ejects), vhostd regions {regions()}; guest MemTotal {mem_after >> 10} MiB; "
              f"vhostd fds {fds1}, memfd mappings {maps1}", file=sys.stderr)
        assert mem_after == mem_plugged - (UNPLUG * DIMM_MB << 10), context()
        assert (fds1, maps1) == (fds0 + DIMMS - UNPLUG, maps0 + DIMMS - UNPLUG), context()

        got = run.finish()
        print(f"[e2e] hotplug: {len(got)} downloads of {FILE_SIZE >> 20} MiB, all sha256 right", file=sys.stderr)
        log = d.stderr()
        assert log.count("memory region added: ") == DIMMS + 1, context()
        assert log.count("memory region removed: ") == UNPLUG, context()
    finally:
        run.close()

VMEM_MB = 1024


def test_virtio_mem_resized_over_qmp(guest_image, netns, sock_dir, http_server):
    """virtio-mem-pci with vhost-user: QEMU maps the device's whole memory region
    (1 GiB) for the backend once (one more region: ADD_MEM_REG), and plugging or
    unplugging blocks inside it by changing requested-size sends vhostd nothing
    (the region stays mapped; unplugged blocks are discarded in QEMU). The guest's
    virtio_mem driver grows to 512 MiB, then shrinks to 256 MiB while it downloads."""
    run = Run(guest_image, netns, sock_dir, http_server,
              ["-object", f"memory-backend-memfd,id=vmem0,size={VMEM_MB}M,share=on",
               "-device", "virtio-mem-pci,id=vm0,memdev=vmem0,node=0,requested-size=0"])
    try:
        qmp, context, regions, rounds = run.qmp, run.context, run.regions, run.rounds
        run.wait_rounds(1, timeout=180)
        assert regions() == 2, context()          # base RAM + the virtio-mem region
        mem0 = rounds()[max(rounds())][1]
        figures = []
        for want_mb in (512, 256):
            t0 = time.monotonic()
            qmp.cmd("qom-set", path="/machine/peripheral/vm0", property="requested-size", value=want_mb << 20)
            deadline = time.monotonic() + 60
            while qmp.cmd("qom-get", path="/machine/peripheral/vm0", property="size") != want_mb << 20:
                assert time.monotonic() < deadline, f"virtio-mem did not reach {want_mb} MiB\n" + context()
                time.sleep(0.2)
            took = time.monotonic() - t0
            last = run.wait_rounds(2)
            mem = rounds()[last][1]
            figures.append(f"{want_mb} MiB in {took:.1f} s, guest MemTotal {mem >> 10} MiB")
            assert mem - mem0 == want_mb << 10, context()
            assert regions() == 2, context()
        print(f"\n[e2e] virtio-mem: {'; '.join(figures)} (from {mem0 >> 10} MiB); vhostd regions 2 throughout",
              file=sys.stderr)
        run.finish()
        log = run.d.stderr()
        assert log.count("memory region added: ") == 2 and "memory region removed" not in log, context()
    finally:
        run.close()
