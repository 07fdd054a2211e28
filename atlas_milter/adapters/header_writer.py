"""Owns adding headers at end of message without letting go of the GIL.

pymilter's `addheader` releases the GIL around libmilter's `smfi_addheader` (a small,
buffered socket write) and then takes it back. With many SMTP sessions in flight, taking
it back means queueing behind every thread that is classifying at that moment; five
verdict headers meant five such queues, and those waits were most of the milter's 99th
percentile (24 -> 11 ms per message at 16 sessions, `scripts/milter_bench.py`). Here
`smfi_addheader` is called through `ctypes.PyDLL`, which keeps the GIL for the few
microseconds of the call.

libmilter's functions are looked up through pymilter's own extension module, so they are
those of the libmilter pymilter runs on (Debian's shared library, or one linked in
statically). libmilter's `SMFICTX *` is read from pymilter's context object, whose C
layout (pymilter 1.0.x) is `{PyObject_HEAD; SMFICTX *ctx; PyObject *priv; PyThreadState
*t}`. Before the first use that layout is checked against the live object: its size, the
`priv` slot holding the very object `getpriv()` returns, and libmilter's
`smfi_getpriv(ctx)` pointing back at the context. If any check fails, or the functions
cannot be found, `add()` says so and the caller uses pymilter's own `addheader`, as every
milter without this module does.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import threading

import milter

log = logging.getLogger(__name__)

_POINTER = struct.calcsize("P")
_HEAD = 2 * _POINTER  # PyObject_HEAD: reference count and type
_CTX_OFFSET, _PRIV_OFFSET = _HEAD, _HEAD + _POINTER
_CONTEXT_SIZE = _HEAD + 3 * _POINTER


class _Libmilter:
    """`smfi_addheader` and `smfi_getpriv`, called with the GIL held."""

    def __init__(self) -> None:
        # The libmilter pymilter runs on: its extension module's own symbol scope (the
        # shared library it links, or libmilter linked into it statically).
        lib = ctypes.PyDLL(milter.__file__)
        self.addheader = lib.smfi_addheader
        self.addheader.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p)
        self.addheader.restype = ctypes.c_int
        self.getpriv = lib.smfi_getpriv
        self.getpriv.argtypes = (ctypes.c_void_p,)
        self.getpriv.restype = ctypes.c_void_p


_lock = threading.Lock()
_lib: _Libmilter | None = None
_checked = False  # the layout check has run (whatever its outcome)


def _smfictx(context: object) -> int | None:
    """The SMFICTX pointer inside pymilter's context object, or None if its layout is not
    the one this module knows."""
    if type(context).__basicsize__ != _CONTEXT_SIZE:
        return None
    base = id(context)
    ctx = ctypes.c_void_p.from_address(base + _CTX_OFFSET).value
    priv = ctypes.c_void_p.from_address(base + _PRIV_OFFSET).value
    if not ctx or priv != id(context.getpriv()):  # type: ignore[attr-defined]
        return None
    return ctx


def _is_libmilter_context(context: object) -> bool:
    kind = type(context)
    return kind.__module__ == "milter" and kind.__name__ == "Context"


def _fast_path(context: object) -> _Libmilter | None:
    global _lib, _checked
    if _checked:
        return _lib
    with _lock:
        if not _checked:
            try:
                lib = _Libmilter()
                ctx = _smfictx(context)
                if ctx is None or lib.getpriv(ctx) != id(context):
                    raise RuntimeError("pymilter's context object has an unexpected layout")
                _lib = lib
                log.info("milter: verdict headers are added through libmilter with the GIL held")
            except Exception as exc:  # anything unexpected: pymilter's own call is always right
                log.info("milter: headers are added through pymilter (GIL released per header): %s", exc)
            _checked = True
    return _lib


def add(context: object, name: str, value: str) -> bool:
    """Append header `name: value` to the message of pymilter context `context` (end of
    message only) without releasing the GIL. False when that cannot be done for this
    context (not libmilter's, e.g. Milter.testctx, or an unknown layout): the caller then
    uses pymilter's `addheader`. Raises RuntimeError when libmilter refuses the header."""
    lib = _fast_path(context) if _is_libmilter_context(context) else None
    if lib is None:
        return False
    ctx = ctypes.c_void_p.from_address(id(context) + _CTX_OFFSET).value
    if lib.addheader(ctx, name.encode(), value.encode()) != 0:
        raise RuntimeError("cannot add header")
    return True
