"""Seed corpus for fuzz_messages.py: what the tests' frontend double really sends.

Runs the daemon integration tests (tests/daemon/test_daemon.py, one event loop kind)
with Frontend.send_raw wrapped: every sendmsg() of every connection is recorded
with a description of the fds it carried (fuzz/seedfmt.py), and each connection
becomes one seed. Needs root (the tests create TAPs in network namespaces).

    .venv/bin/python fuzz/record_message_seeds.py fuzz/corpus/messages [pytest args...]
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import sys
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402

import seedfmt  # noqa: E402

F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SHRINK = 0x0002


def describe_fd(fd: int, previous: int | None) -> int:
    if previous is not None and fd == previous:
        return seedfmt.SAME_AS_PREVIOUS
    st = os.fstat(fd)
    if previous is not None:
        p = os.fstat(previous)
        if (p.st_dev, p.st_ino) == (st.st_dev, st.st_ino):
            return seedfmt.SAME_AS_PREVIOUS
    if stat.S_ISREG(st.st_mode):
        if st.st_size == 0:
            return seedfmt.MEMFD_EMPTY
        try:
            sealed = bool(fcntl.fcntl(fd, F_GET_SEALS) & F_SEAL_SHRINK)
        except OSError:
            sealed = False
        return seedfmt.memfd_spec(st.st_size, sealed)
    target = os.readlink(f"/proc/self/fd/{fd}")
    if "eventfd" in target:
        return seedfmt.EVENTFD
    if target.startswith("pipe:"):
        return seedfmt.PIPE
    if target.startswith("socket:"):
        return seedfmt.SOCKET
    return seedfmt.DEVNULL


class Recorder:
    """pytest plugin: wraps Frontend.send_raw for the whole session."""

    def __init__(self) -> None:
        self.streams: list[list] = []
        self.names: list[str] = []
        self.by_sock: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.current_test = "setup"

    def pytest_runtest_setup(self, item):
        self.current_test = item.name

    def pytest_sessionstart(self, session):
        from tests.driver.frontend import Frontend

        original = Frontend.send_raw
        rec = self

        def send_raw(fe, data, fds=()):
            key = rec.by_sock.get(fe.sock)
            if key is None:
                key = rec.by_sock[fe.sock] = len(rec.streams)
                rec.streams.append([])
                rec.names.append(rec.current_test)
            specs, prev = [], None
            for fd in list(fds)[:15]:
                specs.append(describe_fd(fd, prev))
                prev = fd
            rec.streams[key].append((specs, bytes(data)))
            return original(fe, data, fds)

        Frontend.send_raw = send_raw


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "fuzz" / "corpus" / "messages")
    args = sys.argv[2:] or [str(ROOT / "tests" / "daemon" / "test_daemon.py"), "-k", "not asyncio", "-q",
                            "-p", "no:cacheprovider"]
    rec = Recorder()
    rc = pytest.main(args, plugins=[rec])
    out.mkdir(parents=True, exist_ok=True)
    seen = set()
    for key, chunks in enumerate(rec.streams):
        data = seedfmt.encode(chunks)
        digest = hashlib.sha1(data).hexdigest()[:8]
        if not chunks or digest in seen:
            continue
        seen.add(digest)
        name = rec.names[key].replace("[", "-").replace("]", "").replace("/", "_")
        (out / f"seed-{name}-{digest}").write_bytes(data)
    print(f"{len(seen)} message seeds from {len(rec.streams)} connections in {os.path.relpath(out)}")
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
