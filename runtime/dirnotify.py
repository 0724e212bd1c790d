"""Wake an asyncio loop when files in a directory change (Linux inotify, through ctypes).

The delivery child follows ``data/flow`` as a RocksDB secondary. Instead of polling it every
few milliseconds while idle, it sleeps up to 100 ms and lets the flow's writes wake it: each
write appends to the WAL (``IN_MODIFY``), new files (WAL, SST, MANIFEST) appear with
``IN_CREATE`` / ``IN_MOVED_TO``. Where inotify is not available, ``start`` returns False and
the caller keeps polling::

    notify = DirNotify(flow_db.path, on_change)
    if not notify.start(asyncio.get_running_loop()):
        ...  # poll instead
    notify.pause()   # busy: polling on a timer anyway, no wake-up per write
    notify.resume()  # idle again: writes made meanwhile wake at once
    notify.close()
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100


class DirNotify:
    """Calls ``callback`` (on the loop's thread) after files in ``path`` changed."""

    def __init__(self, path: str | Path, callback: Callable[[], None]) -> None:
        self._path = os.fsencode(str(path))
        self._callback = callback
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._armed = False

    def start(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Watch the directory; False if this platform or process cannot (then poll)."""
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            if libc.inotify_add_watch(fd, self._path, IN_MODIFY | IN_CREATE | IN_MOVED_TO) < 0:
                err = ctypes.get_errno()
                os.close(fd)
                raise OSError(err, "inotify_add_watch")
        except (OSError, AttributeError) as e:
            log.info("no inotify for %s (%s): polling", self._path.decode(errors="replace"), e)
            return False
        self._fd = fd
        self._loop = loop
        self.resume()
        return True

    def pause(self) -> None:
        """Stop waking the loop until ``resume``: a caller that polls anyway while it is busy
        saves one wake-up per write (the flow writes once per commit)."""
        if self._armed and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._armed = False

    def resume(self) -> None:
        """Wake the loop on changes again. Changes made while paused are kept by the kernel:
        the callback runs at once for them (it errs towards waking, never misses a write)."""
        if not self._armed and self._fd >= 0 and self._loop is not None:
            self._loop.add_reader(self._fd, self._ready)
            self._armed = True

    def _ready(self) -> None:
        try:
            while os.read(self._fd, 65536):  # drain: one callback for everything queued
                pass
        except BlockingIOError:
            pass
        except OSError:
            log.exception("reading inotify events failed")
        self._callback()

    def close(self) -> None:
        if self._fd >= 0:
            self.pause()
            os.close(self._fd)
            self._fd = -1
