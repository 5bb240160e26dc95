"""vhostd: a vhost-user network backend serving QEMU guests' virtio-net through a host TAP."""

__version__ = "0.1.0"
