"""virtio-net feature policy: the feature bits (defined here once for Python),
what the device offers, the dependency rules a driver must follow, the vnet
header length and the TAP offloads a set of acked features allows.

virtio 1.2 §5.1.3 (feature bits), §5.1.3.1 (dependencies), §5.1.6 (the vnet
header), §6 (reserved feature bits: rings, VERSION_1). The C datapath has its own
copies as VR_F_* in csrc/vhostd.h; tests/test_virtio_net.py checks they agree.
Pure policy: no queue pair, no worker, no C call.
"""
from __future__ import annotations

from vhostd import tap as taplib
from vhostd.protocol import F_LOG_ALL, F_PROTOCOL_FEATURES, ProtocolFeature, bit

# virtio-net device features (virtio 1.2 §5.1.3)
F_CSUM = 0
F_GUEST_CSUM = 1
F_MTU = 3
F_GUEST_TSO4 = 7
F_GUEST_TSO6 = 8
F_GUEST_ECN = 9
F_GUEST_UFO = 10
F_HOST_TSO4 = 11
F_HOST_TSO6 = 12
F_HOST_ECN = 13
F_HOST_UFO = 14
F_MRG_RXBUF = 15
F_GUEST_ANNOUNCE = 21
F_MQ = 22
F_GUEST_USO4 = 54
F_GUEST_USO6 = 55
F_HOST_USO = 56
# reserved (device-independent) feature bits (virtio 1.2 §6)
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_RING_PACKED = 34
F_IN_ORDER = 35

FEATURE_NAMES = {
    F_CSUM: "CSUM", F_GUEST_CSUM: "GUEST_CSUM", F_MTU: "MTU", F_GUEST_TSO4: "GUEST_TSO4",
    F_GUEST_TSO6: "GUEST_TSO6", F_GUEST_ECN: "GUEST_ECN", F_GUEST_UFO: "GUEST_UFO", F_HOST_TSO4: "HOST_TSO4",
    F_HOST_TSO6: "HOST_TSO6", F_HOST_ECN: "HOST_ECN", F_HOST_UFO: "HOST_UFO", F_MRG_RXBUF: "MRG_RXBUF",
    F_GUEST_ANNOUNCE: "GUEST_ANNOUNCE", F_MQ: "MQ", F_LOG_ALL: "LOG_ALL", F_INDIRECT_DESC: "INDIRECT_DESC",
    F_EVENT_IDX: "EVENT_IDX",
    F_PROTOCOL_FEATURES: "PROTOCOL_FEATURES", F_VERSION_1: "VERSION_1", F_RING_PACKED: "RING_PACKED",
    F_IN_ORDER: "IN_ORDER", F_GUEST_USO4: "GUEST_USO4", F_GUEST_USO6: "GUEST_USO6", F_HOST_USO: "HOST_USO",
}


def feature_names(features: int, names: dict[int, str] = FEATURE_NAMES) -> list[str]:
    return [names.get(b, f"bit{b}") for b in range(64) if features >> b & 1]


# What the datapath implements for every guest (the USO bits are added when the host's
# TAP supports them, MTU when the port has one configured, MQ with several queue pairs).
# Live migration (vhost-user spec, "Migration"): LOG_ALL, the dirty log the datapath
# marks while it is acked; GUEST_ANNOUNCE lets QEMU ask a migrated guest to announce
# itself (QEMU serves the control queue that carries it; the backend only offers the bit).
DATAPATH_FEATURES = sum(bit(b) for b in (
    F_VERSION_1, F_INDIRECT_DESC, F_EVENT_IDX, F_MRG_RXBUF, F_RING_PACKED,
    F_CSUM, F_GUEST_CSUM, F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO,
    F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO,
    F_LOG_ALL, F_GUEST_ANNOUNCE,
))
USO_FEATURES = bit(F_GUEST_USO4) | bit(F_GUEST_USO6) | bit(F_HOST_USO)


def offered_features(queue_pairs: int, mtu: bool = False, uso: bool = False) -> int:
    features = DATAPATH_FEATURES | bit(F_PROTOCOL_FEATURES)
    if queue_pairs > 1:
        features |= bit(F_MQ)
    if mtu:
        features |= bit(F_MTU)
    if uso:
        features |= USO_FEATURES
    return features


# LOG_SHMFD: the dirty log comes as a shared memfd (SET_LOG_BASE); RARP: QEMU asks for
# an announce frame (SEND_RARP) after a migration when the guest cannot announce itself.
OFFERED_PROTOCOL_FEATURES = (bit(ProtocolFeature.MQ) | bit(ProtocolFeature.REPLY_ACK) | bit(ProtocolFeature.STATUS)
                             | bit(ProtocolFeature.NET_MTU) | bit(ProtocolFeature.LOG_SHMFD)
                             | bit(ProtocolFeature.RARP) | bit(ProtocolFeature.CONFIGURE_MEM_SLOTS)
                             | bit(ProtocolFeature.RESET_DEVICE))


# Guest receive offloads -> what the TAP may hand us (TUNSETOFFLOAD). All need GUEST_CSUM.
_GUEST_OFFLOADS = (
    (F_GUEST_TSO4, taplib.TUN_F_TSO4),
    (F_GUEST_TSO6, taplib.TUN_F_TSO6),
    (F_GUEST_ECN, taplib.TUN_F_TSO_ECN),
    (F_GUEST_UFO, taplib.TUN_F_UFO),
    (F_GUEST_USO4, taplib.TUN_F_USO4),
    (F_GUEST_USO6, taplib.TUN_F_USO6),
)


def tap_offloads(features: int) -> int:
    """TUN_F_* flags for the guest offloads acked: the TAP then passes GSO frames
    and partial checksums straight through to the guest (virtio 1.2 §5.1.6.4)."""
    if not features & bit(F_GUEST_CSUM):
        return 0
    flags = taplib.TUN_F_CSUM
    for feature, tun_flag in _GUEST_OFFLOADS:
        if features & bit(feature):
            flags |= tun_flag
    uso = taplib.TUN_F_USO4 | taplib.TUN_F_USO6
    if flags & uso != uso:
        # Linux's TUNSETOFFLOAD takes USO4 and USO6 only together (EINVAL otherwise):
        # a guest that acked one of them gets UDP segments the TAP splits itself.
        flags &= ~uso
    if not flags & (taplib.TUN_F_TSO4 | taplib.TUN_F_TSO6):
        # GUEST_ECN without GUEST_TSO4/6 (virtio 1.2 §5.1.3.1 forbids it, QEMU lets a
        # guest ack it): ECN only qualifies TCP segments, so there is nothing to pass.
        flags &= ~taplib.TUN_F_TSO_ECN
    return flags


# virtio 1.2 §5.1.3.1: a driver must not accept a feature without the one it depends on.
FEATURE_DEPENDS = (
    (F_GUEST_TSO4, F_GUEST_CSUM), (F_GUEST_TSO6, F_GUEST_CSUM), (F_GUEST_UFO, F_GUEST_CSUM),
    (F_GUEST_USO4, F_GUEST_CSUM), (F_GUEST_USO6, F_GUEST_CSUM), (F_HOST_TSO4, F_CSUM), (F_HOST_TSO6, F_CSUM),
    (F_HOST_UFO, F_CSUM), (F_HOST_USO, F_CSUM),
)


def check_dependencies(features: int) -> str | None:
    """A description of the first broken feature dependency, or None."""
    for feature, needs in FEATURE_DEPENDS:
        if features & bit(feature) and not features & bit(needs):
            return f"{FEATURE_NAMES[feature]} acked without {FEATURE_NAMES[needs]}"
    if features & bit(F_GUEST_ECN) and not features & (bit(F_GUEST_TSO4) | bit(F_GUEST_TSO6)):
        return "GUEST_ECN acked without GUEST_TSO4 or GUEST_TSO6"
    if features & bit(F_HOST_ECN) and not features & (bit(F_HOST_TSO4) | bit(F_HOST_TSO6)):
        return "HOST_ECN acked without HOST_TSO4 or HOST_TSO6"
    return None


def broken_dependencies(features: int) -> list[str]:
    """Every broken feature dependency of an acked set (empty when consistent).

    A real QEMU guest can ack such a set (virtio-net-pci offload properties switched
    off while a dependent one stays on); it is served, with the offloads that lack
    their prerequisite left unused: tap_offloads() gives the guest GSO or partial
    checksums only with GUEST_CSUM, and a driver without CSUM sends no frame that
    needs the device to finish a checksum (virtio 1.2 §5.1.6.2)."""
    broken = [
        f"{FEATURE_NAMES[feature]} without {FEATURE_NAMES[needs]}"
        for feature, needs in FEATURE_DEPENDS
        if features & bit(feature) and not features & bit(needs)
    ]
    if features & bit(F_GUEST_ECN) and not features & (bit(F_GUEST_TSO4) | bit(F_GUEST_TSO6)):
        broken.append("GUEST_ECN without GUEST_TSO4 or GUEST_TSO6")
    if features & bit(F_HOST_ECN) and not features & (bit(F_HOST_TSO4) | bit(F_HOST_TSO6)):
        broken.append("HOST_ECN without HOST_TSO4 or HOST_TSO6")
    return broken


def vnet_hdr_len(features: int) -> int:
    """virtio 1.2 §5.1.6: num_buffers is present with VERSION_1 or MRG_RXBUF."""
    return 12 if features & (bit(F_VERSION_1) | bit(F_MRG_RXBUF)) else 10
