"""Owns everything that touches libmilter's C side: the `milter` extension module of
pymilter (registering the callbacks, opening its socket, running and stopping it), the
ctypes calls (adding headers with the GIL held, glibc's `mallopt` and `malloc_trim`) and the /proc/self/fd
scan that sets TCP_NODELAY on libmilter's listening socket. Nothing else in the package
imports `milter` or `ctypes`; the process runtime (runtime.py) decides when to call these.

Adding headers without letting go of the GIL: pymilter's `addheader` releases the GIL
around libmilter's `smfi_addheader` (a small, buffered socket write) and then takes it
back. With many SMTP sessions in flight, taking it back means queueing behind every
thread that is classifying at that moment; five verdict headers meant five such queues,
and those waits were most of the milter's 99th percentile (24 -> 11 ms per message at 16
sessions, `scripts/milter_bench.py`). Here `smfi_addheader` is called through
`ctypes.PyDLL`, which keeps the GIL for the few microseconds of the call.

libmilter's functions are looked up through pymilter's own extension module, so they are
those of the libmilter pymilter runs on (Debian's shared library, or one linked in
statically). libmilter's `SMFICTX *` is read from pymilter's context object, whose C
layout (pymilter 1.0.x) is `{PyObject_HEAD; SMFICTX *ctx; PyObject *priv; PyThreadState
*t}`. Before the first use that layout is checked against the live object: its size, the
`priv` slot holding the very object `getpriv()` returns, and libmilter's
`smfi_getpriv(ctx)` pointing back at the context. If any check fails, or the functions
cannot be found, `add_header()` says so and the caller uses pymilter's own `addheader`, as every
milter without this module does.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import stat
import struct
import threading
import time
from typing import Any, Callable

import Milter
import milter

from atlas_milter.errors import AtlasError

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


def add_header(context: object, name: str, value: str) -> bool:
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


# --- running libmilter ----------------------------------------------------------------------

LISTENER_POLL_S = 5.0  # libmilter's listener polls its socket this long between looks at the stop flag


def _register(factory: Callable[[], Any], flags: int) -> None:
    Milter.factory = factory
    milter.set_flags(flags)
    milter.set_exception_policy(Milter.TEMPFAIL)  # never reached: every callback catches
    milter.set_connect_callback(Milter.connect_callback)
    milter.set_helo_callback(lambda ctx, host: ctx.getpriv().hello(host))
    milter.set_envfrom_callback(lambda ctx, *b: ctx.getpriv().envfrom_bytes(*b))
    milter.set_envrcpt_callback(lambda ctx, *b: ctx.getpriv().envrcpt_bytes(*b))
    milter.set_header_callback(lambda ctx, f, v: ctx.getpriv().header_bytes(f, v))
    milter.set_eoh_callback(lambda ctx: ctx.getpriv().eoh())
    milter.set_body_callback(lambda ctx, chunk: ctx.getpriv().body(chunk))
    milter.set_eom_callback(lambda ctx: ctx.getpriv().eom())
    milter.set_abort_callback(lambda ctx: ctx.getpriv().abort())
    milter.set_close_callback(Milter.close_callback)


def listen(factory: Callable[[], Any], flags: int, name: str, spec: str, timeout: int, where: str) -> None:
    """Register the callbacks (`factory()` makes the object of a connection; `flags` are
    the actions asked for) and open libmilter's socket `spec`; AtlasError when it cannot
    listen (`where`: the socket as configured, for the message)."""
    _register(factory, flags)
    milter.setconn(spec)
    milter.settimeout(timeout)
    milter.register(name, data=lambda ctx: ctx.getpriv().data(),
                    unknown=lambda ctx, cmd: ctx.getpriv().unknown(cmd),
                    negotiate=Milter.negotiate_callback)
    try:
        milter.opensocket(True)
    except milter.error as exc:
        raise AtlasError(f"--socket {where}: cannot listen ({exc}); is another milter using it?") from None


def run(where: str) -> None:
    """libmilter's main loop, until its signal thread (or `stop_now`) stops it."""
    try:
        milter.main()
    except milter.error as exc:
        raise AtlasError(f"milter on {where} failed: {exc}") from None


def stop_now(wake: Callable[[], None]) -> None:
    """What SIGUSR2 does: libmilter's stop, as on SIGTERM (no new connections, those in
    progress finish), without its wait of up to 5 s. smfi_stop() sets the stop flag and then
    waits for the listener, which holds its lock while it polls the listening socket with a
    5 s timeout; a connection to our own socket (`wake()`) ends that poll, the listener sees the flag
    and lets go. (The wake-up connection closes at once; libmilter drops it.)"""
    log.info("atlas-milter: stop requested (SIGUSR2)")
    stopper = threading.Thread(target=milter.stop, name="atlas-stop", daemon=True)
    stopper.start()
    deadline = time.monotonic() + 2 * LISTENER_POLL_S
    while stopper.is_alive() and time.monotonic() < deadline:
        stopper.join(0.05)
        if stopper.is_alive():
            wake()


def set_nodelay_on_listener(port: int) -> bool:
    """Set TCP_NODELAY on libmilter's listening socket (found among our open descriptors
    after smfi_opensocket); Linux copies it to every accepted connection. Without it each
    of our back-to-back small replies at end of message waits on the MTA's delayed ACK."""
    done = False
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if (sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and sock.getsockname()[1] == port):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                done = True
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays libmilter's
    return done


MALLOC_ARENAS = 2  # glibc malloc arenas of the milter process (see limit_malloc_arenas)
_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def release_free_heap() -> bool:
    """Hand the heap memory freed since start back to the system (glibc's malloc_trim):
    reading the model file peaks ~5 MB above what the loaded model keeps, and without this
    the milter's resident memory stays at the peak. False where this does not apply."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    return malloc_trim(0) == 1


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas (mallopt M_ARENA_MAX) unless MALLOC_ARENA_MAX is set in the
    environment (then glibc already applied it). libmilter runs every SMTP connection on a
    new thread and glibc hands new threads arenas of their own, up to 8 per core, where
    freed memory fragments: under sustained load (scripts/soak.py, 150 messages/s) the
    milter's RSS crept up ~5 MB a minute with the default and stayed flat with 2 arenas, at
    the same latency. False where this does not apply (not glibc, or mallopt refused)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt(_M_ARENA_MAX, arenas) == 1
