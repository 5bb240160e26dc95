"""cffi builder (out-of-line API mode) for vhostd._native.

The cdef is the marked section of csrc/vhostd.h, so the header is the single
source of truth for the C interface. `pip install .` runs this through setup.py;
`python vhostd/_build_ffi.py` builds the extension in place for development.

VHOSTD_SANITIZE=1 builds it with AddressSanitizer and UndefinedBehaviorSanitizer
(scripts/test-sanitize.sh): the interpreter is not instrumented, so processes
importing such a build need the runtimes preloaded (LD_PRELOAD of the compiler's
libasan and libubsan, see that script).
"""
import glob
import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC = os.path.join(os.path.dirname(_HERE), "csrc")


def _cdef_from_header(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.index("/* cdef-begin */") + len("/* cdef-begin */")
    end = text.index("/* cdef-end */")
    return text[start:end]


_COMPILE_ARGS = ["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-pthread"]
_LINK_ARGS = ["-pthread"]
# Any UB report aborts (no recover), so a test run cannot pass over one.
_SANITIZE_ARGS = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
if os.environ.get("VHOSTD_SANITIZE", "") not in ("", "0"):
    _COMPILE_ARGS = [a for a in _COMPILE_ARGS if a != "-O2"] + ["-O1"] + _SANITIZE_ARGS
    _LINK_ARGS = _LINK_ARGS + _SANITIZE_ARGS

ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header(os.path.join(_CSRC, "vhostd.h")))
ffibuilder.set_source(
    "vhostd._native",
    '#include "vhostd.h"',
    # Relative paths: setuptools wants sources relative to setup.py.
    sources=sorted(os.path.relpath(p, os.path.dirname(_HERE)) for p in glob.glob(os.path.join(_CSRC, "*.c"))),
    include_dirs=[os.path.relpath(_CSRC, os.path.dirname(_HERE))],
    extra_compile_args=_COMPILE_ARGS,
    extra_link_args=_LINK_ARGS,
)

if __name__ == "__main__":
    os.chdir(os.path.dirname(_HERE))
    built = os.path.abspath(ffibuilder.compile(tmpdir=".", verbose=False))
    # pip names its build _native.abi3.so, this one _native.cpython-3XX-....so, and
    # the interpreter prefers the latter: drop every other variant so that the
    # extension imported is always the one built last.
    for other in glob.glob(os.path.join(_HERE, "_native*.so")):
        if os.path.abspath(other) != built:
            os.unlink(other)
