"""The driver's native (C++) log lines that are known noise, kept off the console; they stay in Ray's log file.

Ray's core worker inside the driver process writes its ERROR-level lines straight to file descriptor 2 as well as to
its own log file (``python-core-driver-*.log`` under the session's ``logs``). Python's logging and warnings filters
never see them, and Ray has no setting that keeps them off stderr. One of them is printed for every Ray Data actor
pool a stage starts: "... has constructor arguments in the object store and max_restarts > 0" (ray-project/ray#53727:
Ray Data always passes its map transformer by reference, and our generation actors must be restartable).

So the console entry point (not a library caller, not pytest) makes the driver's fd 2 a pipe, read by one thread
that drops the known lines and passes every other byte on at once (progress bars included). Nothing else is
rewritten; ``--verbose`` leaves stderr alone.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

from ray_e5.console import NOISY_LINES

# A line of Ray's C++ logger: "[2026-12-06 04:56:06,487 E 2213 2213] core_worker.cc:2465: ..."
NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d [\d:,.]+ [DIWEF] \d+ \d+\] ")
_NATIVE_START = re.compile(rb"^\[\d")


def is_noise(line: bytes) -> bool:
    """A native log line whose message is known noise (the same list as the workers' forwarded lines)."""
    return bool(NATIVE_LINE.match(line)) and NOISY_LINES.search(line.decode("utf-8", "replace")) is not None


def _kept(line: bytes) -> bytes:
    """A whole line as it goes on (its newline included), or without its native noise: after a bar's last
    carriage return, a native line may share the terminal line with it."""
    bar, cr, last = line.rpartition(b"\r")
    return bar + cr if is_noise(last) else line + b"\n"


def _maybe_native(partial: bytes) -> bool:
    """Whether a line not yet ended could still become a native log line (then it waits for its newline): it has
    a native line's header, or is shorter than one and starts as one does."""
    if NATIVE_LINE.match(partial):
        return True
    return len(partial) < 48 and (partial == b"[" or _NATIVE_START.match(partial) is not None)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


class NativeStderrFilter:
    """fd 2 through a pipe whose reader drops :func:`is_noise` lines; :meth:`stop` restores it and drains."""

    def __init__(self):
        self.original: int | None = None
        self.reader: int | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> "NativeStderrFilter":
        sys.stderr.flush()
        self.original = os.dup(2)
        self.reader, writer = os.pipe()
        os.dup2(writer, 2)
        os.close(writer)
        self.thread = threading.Thread(target=self._pump, name="ray-e5-native-stderr", daemon=True)
        self.thread.start()
        atexit.register(self.stop)
        return self

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.reader, 65536)
            except OSError:
                break
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            out = b"".join(_kept(line) for line in lines)
            # a progress bar redraws its line after a carriage return: what follows the last one is the line
            bar, cr, pending = pending.rpartition(b"\r")
            out += bar + cr
            if pending and not _maybe_native(pending):
                out, pending = out + pending, b""
            if out:
                try:
                    _write_all(self.original, out)
                except OSError:
                    break
        if pending and not is_noise(pending):
            try:
                _write_all(self.original, pending)
            except OSError:
                pass

    def stop(self) -> None:
        """Give fd 2 back (this closes the pipe's writing end) and let the reader pass on what is left."""
        if self.original is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.original, 2)
        # A subprocess started meanwhile may still hold the writing end: then the reader never sees its end, and
        # the wait is bounded.
        self.thread.join(timeout=1.0)
        self.original = None


def filter_native_stderr() -> NativeStderrFilter | None:
    """Start the filter in a console process (None when stderr has no file descriptor to take over)."""
    try:
        sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return NativeStderrFilter().start()
