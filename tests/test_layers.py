"""The control plane's import graph reads top-down (docs/ARCHITECTURE.md): a
module of vhostd/ imports only modules of a lower layer, never one beside or
above it, counting imports inside functions too."""
import ast
from pathlib import Path

import vhostd

LAYERS = (
    ("__main__",),                                          # python -m vhostd
    ("cli",),                                               # command lines
    ("daemon", "ctl"),                                      # the daemon; vhostctl (a client)
    ("control",),                                           # the control socket
    ("port", "metrics", "ringstate"),                       # one port; what the control socket reports
    ("dispatch",),                                          # the request table, one connection's loop
    ("session",),                                           # the meaning of each request
    ("device",),                                            # queue pairs and workers
    ("dirty_log",),                                         # the migration log (checked like memory)
    ("memory", "virtio_net", "vring", "connection", "capture", "saved_rings", "config"),
    ("tap", "unixsock", "native", "protocol", "stats"),
    ("fds", "errors"),                                      # imported by everyone
)
LAYER = {m: i for i, names in enumerate(LAYERS) for m in names}
PACKAGE = Path(vhostd.__file__).parent
PRIVATE = {"_native", "_build_ffi", "__init__"}  # the extension (native.py's alone), its builder


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vhostd":
            parts = node.module.split(".")
            out |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vhostd.")}
    return out - {"__version__"}


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - PRIVATE
    assert modules == set(LAYER), modules ^ set(LAYER)


def test_imports_go_down_only():
    wrong = []
    for module, layer in LAYER.items():
        for dep in imports(PACKAGE / f"{module}.py"):
            if dep == "_native" and module == "native":
                continue
            if LAYER.get(dep, -1) <= layer:
                wrong.append(f"{module} (layer {layer}) imports {dep} (layer {LAYER.get(dep)})")
    assert not wrong, "\n".join(wrong)
