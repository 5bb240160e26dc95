"""The one exception tree of vhostd. Messages are short and specific, values in hex."""


class VhostError(Exception):
    """Base of every error vhostd raises on purpose."""


class SetupError(VhostError):
    """The daemon cannot start a port (socket in use, TAP busy, namespace missing...)."""


class ProtocolError(VhostError):
    """The frontend sent something that breaks the vhost-user protocol.

    The connection is closed: after a framing error the stream cannot be trusted.
    """


class RequestError(VhostError):
    """A well-formed request that cannot be honoured (bad value, wrong state).

    The frontend gets a failure reply where one is expected; the connection lives on.
    """


class UnsupportedRequest(RequestError):
    """A request this backend does not implement."""


class NativeError(VhostError):
    """A C datapath call failed; carries the errno."""

    def __init__(self, errno_: int, what: str):
        import os

        super().__init__(f"{what}: {os.strerror(errno_)}")
        self.errno = errno_


class WorkerStuck(VhostError):
    """A queue pair's worker did not park within the pause timeout: its port fails
    (the frontend is dropped); the daemon and its other ports go on."""


class ControlError(VhostError):
    """A vhostctl request failed (daemon not running, unknown port...)."""
