"""Plumbing of the benchmark harness (bench/run.py): child processes, the
interactive dpdk-testpmd driver, CPU accounting from /proc, stats files written by
the C helpers, and the machine description.

Nothing here knows what a measurement point is; harness.py does.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import platform
import signal
import struct
import subprocess
import sys
import time

from testpmd import PromptError, PromptReader, parse_port_stats

HELPERS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HELPERS)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    pass


class Proc:
    """A child in its own session (so its whole group can be ended by its id),
    output to LOGDIR/NAME.log (the command line first; with stdout_pipe the output
    comes through self.p.stdout and the caller copies it there)."""

    def __init__(self, name: str, argv: list[str], logdir: str, stdin_pipe: bool = False,
                 stdout_pipe: bool = False):
        self.name = name
        self.argv = argv
        self.logpath = os.path.join(logdir, f"{name}.log")
        self._log = open(self.logpath, "ab")
        self._log.write(("$ " + " ".join(argv) + "\n").encode())
        self._log.flush()
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                                  stdout=subprocess.PIPE if stdout_pipe else self._log,
                                  stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        self.pid = self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def tail(self, n: int = 15) -> str:
        try:
            with open(self.logpath, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""

    def died(self, what: str = "exited") -> BenchError:
        """A BenchError whose first line ends with the child's last line of output."""
        tail = self.tail()
        last = next((ln for ln in reversed(tail.splitlines()) if ln.strip()), "")
        return BenchError(f"{self.name} {what}: {last.strip()[:160]}\n{tail}")

    def wait(self, timeout: float) -> int | None:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 8.0) -> None:
        if self.alive():
            if self.p.stdin:
                try:
                    self.p.stdin.close()        # testpmd: EOF on stdin = quit
                except OSError:
                    pass
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            if self.wait(timeout) is None:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(5)
        else:
            # the leader is gone; make sure nothing of its group lingers
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not self._log.closed:
            self._log.close()


class TestPmd(Proc):
    """dpdk-testpmd in interactive mode (-i) under `stdbuf -o0`, driven through its
    prompt (testpmd.py): `show port stats 0` gives exact counters at the moment we ask."""

    def __init__(self, name: str, argv: list[str], logdir: str):
        super().__init__(name, argv, logdir, stdin_pipe=True, stdout_pipe=True)
        self._out = PromptReader(self.p.stdout.fileno(), self._to_log)

    def _to_log(self, chunk: bytes) -> None:
        try:
            self._log.write(chunk)
            self._log.flush()
        except ValueError:      # log closed by stop()
            pass                # (b"" at the end: nothing to write; stop() closes it)

    def prompt(self, timeout: float = 30.0) -> str:
        try:
            return self._out.until_prompt(timeout)
        except PromptError as exc:
            raise BenchError(f"{self.name}: {exc}:\n{self.tail()}") from None

    def cmd(self, line: str, timeout: float = 30.0) -> str:
        try:
            self.p.stdin.write(line.encode() + b"\n")
            self.p.stdin.flush()
        except OSError as exc:
            raise BenchError(f"{self.name}: {exc}:\n{self.tail()}") from None
        return self.prompt(timeout)

    def port_stats(self, port: int = 0) -> tuple[int, int, int, int]:
        """(rx_packets, rx_bytes, tx_packets, tx_bytes) of PORT."""
        try:
            st = parse_port_stats(self.cmd(f"show port stats {port}"))
        except ValueError as exc:
            raise BenchError(f"{self.name}: {exc}") from None
        return st["rx_packets"], st["rx_bytes"], st["tx_packets"], st["tx_bytes"]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 8.0) -> None:
        if self.alive():
            try:
                self.p.stdin.write(b"quit\n")
                self.p.stdin.flush()
            except OSError:
                pass
            if self.wait(3.0) is not None:
                sig = signal.SIGKILL          # only the group's leftovers
        super().stop(sig, timeout)


def run(argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def cpu_times(pid: int) -> float:
    """utime + stime of the whole thread group, seconds (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_stat_cpus() -> dict[int, tuple[int, int]]:
    """{cpu: (busy ticks, total ticks)} from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                vals = [int(x) for x in parts[1:]]
                idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
                out[int(parts[0][3:])] = (sum(vals[:8]) - idle, sum(vals[:8]))
    return out


def read_u64s(path: str, n: int) -> tuple[int, ...]:
    try:
        with open(path, "rb") as f:
            data = f.read(8 * n)
    except OSError:
        return (0,) * n
    if len(data) < 8 * n:
        return (0,) * n
    return struct.unpack(f"<{n}Q", data)


def native_fingerprint() -> str:
    """sha256 (12 hex) of the vhostd C extension(s) in the tree: others may rebuild it mid-run."""
    h = hashlib.sha256()
    d = os.path.join(REPO, "vhostd")
    for f in sorted(os.listdir(d)):
        if f.startswith("_native") and f.endswith(".so"):
            with open(os.path.join(d, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()[:12]


def machine_info() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = 0.0
    try:
        with open("/proc/meminfo") as f:
            mem_gb = int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    git = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False)
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False)
    dpdk = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dpdk-dev"], capture_output=True, text=True,
                          check=False)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "kernel": platform.release(), "cpu": model, "ncpu": os.cpu_count(), "mem_gb": round(mem_gb, 1),
            "python": platform.python_version(),
            "vhostd_commit": git.stdout.strip() + ("+dirty" if dirty.stdout.strip() else ""),
            "vhostd_native": native_fingerprint(), "dpdk": dpdk.stdout.strip(), "loadavg_start": load}
