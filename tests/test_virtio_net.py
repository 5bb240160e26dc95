"""virtio_net.py: the feature bits agree with the datapath's copies (VR_F_* in
csrc/vhostd.h), the offers, the dependency rules (virtio 1.2 §5.1.3.1), the vnet
header length and the TAP offload mapping."""
from vhostd import tap as taplib
from vhostd import virtio_net as vn
from vhostd._native import lib
from vhostd.protocol import F_LOG_ALL, F_PROTOCOL_FEATURES, bit


def test_feature_bits_agree_with_the_datapath():
    python = {name[2:]: value for name, value in vars(vn).items() if name.startswith("F_")}
    python["LOG_ALL"] = F_LOG_ALL
    c = {name[5:]: getattr(lib, name) for name in dir(lib) if name.startswith("VR_F_")}
    assert c, "no VR_F_* constants in the cdef"
    for name, value in c.items():
        assert python.get(name) == value, f"VR_F_{name} = {value}, virtio_net F_{name} = {python.get(name)}"


def test_every_feature_bit_has_a_name():
    for name, value in vars(vn).items():
        if name.startswith("F_"):
            assert vn.FEATURE_NAMES[value] == name[2:]
    assert vn.FEATURE_NAMES[F_PROTOCOL_FEATURES] == "PROTOCOL_FEATURES"
    assert vn.feature_names(bit(vn.F_MQ) | bit(63)) == ["MQ", "bit63"]


def test_offers():
    one = vn.offered_features(1)
    assert one & bit(F_PROTOCOL_FEATURES) and one & bit(vn.F_VERSION_1)
    assert not one & (bit(vn.F_MQ) | bit(vn.F_MTU) | vn.USO_FEATURES)
    assert vn.offered_features(2) & bit(vn.F_MQ)
    assert vn.offered_features(1, mtu=True) & bit(vn.F_MTU)
    assert vn.offered_features(1, uso=True) & vn.USO_FEATURES == vn.USO_FEATURES


def test_dependencies():
    assert vn.check_dependencies(vn.DATAPATH_FEATURES) is None
    assert vn.check_dependencies(bit(vn.F_GUEST_TSO4)) == "GUEST_TSO4 acked without GUEST_CSUM"
    assert vn.check_dependencies(bit(vn.F_HOST_USO)) == "HOST_USO acked without CSUM"
    assert "GUEST_ECN" in vn.check_dependencies(bit(vn.F_GUEST_CSUM) | bit(vn.F_GUEST_ECN))


def test_inconsistent_guest_offloads_give_the_tap_only_what_the_guest_takes():
    # GUEST_TSO4 without GUEST_CSUM: no GSO nor partial checksums towards the guest.
    assert vn.tap_offloads(bit(vn.F_GUEST_TSO4) | bit(vn.F_GUEST_ECN)) == 0
    # GUEST_ECN without GUEST_TSO4/6: checksum offload only.
    assert vn.tap_offloads(bit(vn.F_GUEST_CSUM) | bit(vn.F_GUEST_ECN)) == taplib.TUN_F_CSUM
    assert vn.broken_dependencies(bit(vn.F_GUEST_TSO4) | bit(vn.F_GUEST_ECN) | bit(vn.F_HOST_UFO)) == [
        "GUEST_TSO4 without GUEST_CSUM", "HOST_UFO without CSUM"]
    assert "HOST_ECN" in vn.check_dependencies(bit(vn.F_CSUM) | bit(vn.F_HOST_ECN))


def test_vnet_header_length():
    assert vn.vnet_hdr_len(0) == 10
    assert vn.vnet_hdr_len(bit(vn.F_VERSION_1)) == 12
    assert vn.vnet_hdr_len(bit(vn.F_MRG_RXBUF)) == 12


def test_tap_offloads():
    assert vn.tap_offloads(bit(vn.F_GUEST_TSO4)) == 0  # nothing without GUEST_CSUM
    csum = bit(vn.F_GUEST_CSUM)
    assert vn.tap_offloads(csum | bit(vn.F_GUEST_TSO4)) == taplib.TUN_F_CSUM | taplib.TUN_F_TSO4
    # TUNSETOFFLOAD takes USO4 and USO6 only together
    assert vn.tap_offloads(csum | bit(vn.F_GUEST_USO4)) == taplib.TUN_F_CSUM
    both = csum | bit(vn.F_GUEST_USO4) | bit(vn.F_GUEST_USO6)
    assert vn.tap_offloads(both) == taplib.TUN_F_CSUM | taplib.TUN_F_USO4 | taplib.TUN_F_USO6
