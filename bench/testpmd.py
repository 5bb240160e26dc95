"""Reading dpdk-testpmd's interactive mode (-i, run under `stdbuf -o0`: its command
output is stdio-buffered otherwise): a thread collects what it prints, `until_prompt`
returns the output of one command (up to the next `testpmd> `), `parse_port_stats`
reads `show port stats N`, whose counters are exact at the moment it is asked.

Shared by the benchmark (bench/util.py's TestPmd) and the DPDK virtio-user end to
end test (tests/e2e/test_dpdk_virtio_user.py), which import it as `testpmd` and
`bench.testpmd`. Standard library only.
"""
from __future__ import annotations

import os
import re
import threading
import time
from typing import Callable

PROMPT = b"testpmd> "

_STATS = {
    "rx": re.compile(r"RX-packets:\s*(\d+)\s+RX-missed:\s*(\d+)\s+RX-bytes:\s*(\d+)"),
    "rx_errors": re.compile(r"RX-errors:\s*(\d+)"),
    "rx_nombuf": re.compile(r"RX-nombuf:\s*(\d+)"),
    "tx": re.compile(r"TX-packets:\s*(\d+)\s+TX-errors:\s*(\d+)\s+TX-bytes:\s*(\d+)"),
}


class PromptError(RuntimeError):
    """testpmd exited, or printed no prompt in time."""


class PromptReader:
    """Collects the output of a testpmd whose stdout is the pipe `fd`; `sink` gets
    every chunk as it arrives (a log file), from the reader thread, and b"" once
    at the end of the output."""

    def __init__(self, fd: int, sink: Callable[[bytes], None] | None = None):
        self._fd = fd
        self._sink = sink
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                self._eof = not chunk
                self._buf += chunk
                self._cond.notify_all()
            if self._sink is not None:
                self._sink(chunk)
            if not chunk:
                return

    def until_prompt(self, timeout: float) -> str:
        """What testpmd printed since the last prompt, up to the next one.
        Raises PromptError if it exits or prints no prompt within `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                i = self._buf.find(PROMPT, self._pos)
                if i >= 0:
                    out = bytes(self._buf[self._pos:i])
                    self._pos = i + len(PROMPT)
                    return out.decode(errors="replace")
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise PromptError("exited" if self._eof else f"no prompt within {timeout:g}s")
                self._cond.wait(min(left, 0.2))

    def text(self) -> str:
        """Everything testpmd printed so far."""
        with self._cond:
            return bytes(self._buf).decode(errors="replace")


def parse_port_stats(out: str) -> dict[str, int]:
    """The counters of one `show port stats N` output; ValueError if any is missing."""
    m = {k: r.search(out) for k, r in _STATS.items()}
    if not all(m.values()):
        raise ValueError(f"unparsable port stats:\n{out}")
    rx, tx = m["rx"], m["tx"]
    return {"rx_packets": int(rx[1]), "rx_missed": int(rx[2]), "rx_bytes": int(rx[3]),
            "rx_errors": int(m["rx_errors"][1]), "rx_nombuf": int(m["rx_nombuf"][1]),
            "tx_packets": int(tx[1]), "tx_errors": int(tx[2]), "tx_bytes": int(tx[3])}
