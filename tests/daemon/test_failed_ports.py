"""Ports that cannot be set up, seen by the operator: `vhostctl add-port` and
`vhostctl reload` fail with the reason and leave no TAP behind, a failed port is
listed by `vhostctl ports` (state failed, the reason) and in the metrics, and
every refusal is in the daemon's log."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.test_operations import config_daemon, port_toml, tap_exists  # noqa: F401 (fixture)


def samples(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_add_port_that_cannot_bind_leaves_no_tap_and_is_logged(config_daemon, netns, tmp_path):
    d = config_daemon(["vfa1"])
    plain = tmp_path / "plain.sock"
    plain.write_text("x")
    r = d.ctl("add-port", "--socket", str(plain), "--tap", "vfa2", "--netns", netns)
    assert r.returncode == 1 and "exists and is not a socket" in r.stderr, r.stderr
    assert not tap_exists(netns, "vfa2")
    assert "control: add-port refused:" in d.log() and "exists and is not a socket" in d.log()
    plain.unlink()
    r = d.ctl("add-port", "--socket", str(plain), "--tap", "vfa2", "--netns", netns)
    assert r.returncode == 0, r.stderr
    assert "TAP vfa2 in netns" in d.log() and "(created, persistent)" in d.log().split("TAP vfa2 in netns")[-1]


def test_reload_reports_a_port_that_cannot_be_set_up(config_daemon, netns, tmp_path):
    d = config_daemon(["vfb1"])
    d.config.write_text(d.config.read_text() + port_toml("vfb2", tmp_path, "vhd-no-such-ns"))
    r = d.ctl("reload")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "failed: vfb2" in r.stdout and "vfb2: network namespace vhd-no-such-ns not found" in r.stderr
    rows = {p["name"]: p for p in d.ctl_json("ports")}
    assert rows["vfb1"]["state"] == "waiting" and rows["vfb2"]["state"] == "failed"
    assert "vhd-no-such-ns not found" in rows["vfb2"]["error"]
    one = d.ctl("ports", "vfb2")
    assert one.returncode == 0 and "failed" in one.stdout and "vfb1" not in one.stdout
    m = samples(d.ctl("metrics").stdout)
    assert m[("vhostd_port_up", (("port", "vfb1"),))] == 1
    assert m[("vhostd_port_failed", (("port", "vfb1"),))] == 0
    assert m[("vhostd_port_up", (("port", "vfb2"),))] == 0
    assert m[("vhostd_port_failed", (("port", "vfb2"),))] == 1
    assert m[("vhostd_config_last_reload_successful", ())] == 0
    # a broken file: exit 1, ports unchanged, and the daemon says so in its log
    good = d.config.read_text()
    d.config.write_text("[[port]]\nsocket = 3\n")
    r = d.ctl("reload")
    assert r.returncode == 1 and "socket must be a str" in r.stderr
    assert "reload (vhostctl) failed, ports unchanged" in d.log()
    d.config.write_text(good.replace("vhd-no-such-ns", netns))
    r = d.ctl("reload")
    assert r.returncode == 0, r.stderr
    assert {p["name"]: p["state"] for p in d.ctl_json("ports")} == {"vfb1": "waiting", "vfb2": "waiting"}
    assert samples(d.ctl("metrics").stdout)[("vhostd_config_last_reload_successful", ())] == 1


def test_ports_shows_the_taps_link_and_takes_a_filter(config_daemon, netns):
    d = config_daemon(["vfc1", "vfc2"])
    rows = d.ctl_json("ports", "vfc2")
    assert [p["name"] for p in rows] == ["vfc2"]
    link = rows[0]["link"]
    assert link["mtu"] == 1500 and link["up"] is True and len(link["mac"].split(":")) == 6
    assert {"rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_dropped", "tx_dropped"} <= set(link)
    text = d.ctl("ports", "vfc1").stdout
    assert f"TAP vfc1 in netns {netns}: up, mac" in text and "TAP rx " in text and "vfc2" not in text
    r = d.ctl("ports", "nope")
    assert r.returncode == 1 and "no port named 'nope'" in r.stderr
