"""scripts/gen-docs.py: the man pages and bash completion generated from the
argument parsers name every option of every verb, render without groff warnings,
and complete verbs, options and choices."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vhostd.cli import vhostd_parser
from vhostd.ctl import parser as vhostctl_parser

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-docs.py"), "--man", str(out / "man"),
                    "--completion", str(out / "comp")], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return out


def all_options(p) -> set[str]:
    opts = {o for a in p._actions for o in a.option_strings}
    for a in p._actions:
        for sp in (getattr(a, "choices", None) or {}).values() if isinstance(getattr(a, "choices", None), dict) else ():
            opts |= all_options(sp)
    return opts


@pytest.mark.parametrize("page, parser", [("man8/vhostd.8", vhostd_parser), ("man1/vhostctl.1", vhostctl_parser)])
def test_man_pages_name_every_option_and_render_cleanly(docs, page, parser):
    text = (docs / "man" / page).read_text()
    for opt in all_options(parser()) - {"-h", "--help"}:
        assert opt.replace("-", "\\-") in text, f"{page}: {opt} missing"
    if parser is vhostctl_parser:
        for verb in ("ports", "stats", "capture", "reload", "add-port"):
            assert f".SS {verb}\n" in text
    # groff (groff-base) comes with scripts/install-deps.sh
    # groff is C++: the sanitizer pass's LD_PRELOAD (our ASan build) is not for it
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(docs / "man" / page)], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def complete(docs, prog: str, *words: str) -> list[str]:
    """What bash offers for the last of `words` (COMP_CWORD at it)."""
    script = (f'source {docs / "comp" / prog}; COMP_WORDS=({prog} {" ".join(words) or chr(39) * 2}); '
              f'COMP_CWORD={len(words)}; _{prog}; printf "%s\\n" "${{COMPREPLY[@]}}"')
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return r.stdout.split()


def test_completion(docs):
    assert {"capture", "ports", "--instance"} <= set(complete(docs, "vhostctl", ""))
    assert complete(docs, "vhostctl", "cap") == ["capture"]
    assert "--direction" in complete(docs, "vhostctl", "--control", "/x", "capture", "--d")
    assert complete(docs, "vhostctl", "capture", "vm1", "--direction", "") == ["rx", "tx", "both"]
    assert complete(docs, "vhostctl", "stats", "--w") == ["--watch"]
    assert complete(docs, "vhostd", "--check-c") == ["--check-config"]
    assert complete(docs, "vhostd", "--tap-io", "") == ["auto", "syscall"]


def _actions(p, where=""):
    for a in p._actions:
        yield where, a
        choices = getattr(a, "choices", None)
        if isinstance(choices, dict):
            for name, sp in choices.items():
                yield from _actions(sp, f"{where} {name}")


@pytest.mark.parametrize("parser", [vhostd_parser, vhostctl_parser], ids=["vhostd", "vhostctl"])
def test_every_option_has_a_help_text(parser):
    import argparse

    missing = [f"{where} {'/'.join(a.option_strings) or a.dest}" for where, a in _actions(parser())
               if a.option_strings and a.help != argparse.SUPPRESS and not (a.help or "").strip()]
    assert not missing, f"options without help: {missing}"


def test_readme_option_table_names_every_vhostd_option():
    """README's "Running vhostd" table: one row per option, with its metavar."""
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| flag | meaning |"):text.index("SIGTERM or SIGINT")]
    for a in vhostd_parser()._actions:
        if not a.option_strings or a.option_strings == ["-h", "--help"]:
            continue
        first = a.option_strings[0]
        row = f"| `{first}" + (f" {a.metavar}`" if a.metavar else "")
        assert row in table, f"README option table lacks {row}"
