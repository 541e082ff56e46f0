"""Ctrl-C before Tune takes over: remembered, so no library can swallow it.

Python turns SIGINT into ``KeyboardInterrupt`` at the main thread's next bytecode,
wherever that is. Before the trials, a search spends its time in Ray's client
code (submitting the reference rows' tasks, waiting for them, dropping object
references), and there that next bytecode can be a finaliser or a callback run
from C, where an exception is printed as "Exception ignored" and dropped: the
search then ran on to the end, as if Ctrl-C had never been pressed. The guard
below still raises at once, but also remembers the signal, and the search asks
it at each step before the trials (:meth:`PreTrialInterrupts.check`), so a
swallowed one stops the search there. Python also prints a swallowed exception
("Exception ignored in ...", with a traceback) through ``sys.unraisablehook``:
the guard keeps a remembered Ctrl-C's out of the user's terminal, as the search
stops for it anyway, and passes every other one on. Tune installs its own
handler once the trials start, and the guard gives the previous ones back
before that.

While Ray starts (:meth:`PreTrialInterrupts.deferred`) a first Ctrl-C is only
remembered, and raised once ``ray.init`` has returned: a ``KeyboardInterrupt``
inside it can leave the driver's core worker half made, and its background
thread then crashed the interpreter on the way out (exit -11, "Segmentation
fault", a core file: 3 of 22 Ctrl-Cs at random moments of a search's start). A
second Ctrl-C raises at once, for a start that hangs.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType


class PreTrialInterrupts:
    """A SIGINT handler for the phase before Tune's: raise ``KeyboardInterrupt`` and remember it."""

    def __init__(self) -> None:
        self.received = False
        self._previous: object = None
        self._previous_unraisable = sys.unraisablehook
        self._installed = False
        self._deferring = False

    def __enter__(self) -> PreTrialInterrupts:
        # Only the main thread may set handlers (a search run from a thread keeps the default one).
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)
            self._previous_unraisable = sys.unraisablehook
            sys.unraisablehook = self._on_unraisable
            self._installed = True
        return self

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        first = not self.received
        self.received = True
        if not (self._deferring and first):
            raise KeyboardInterrupt

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside, a first Ctrl-C is remembered and raised when the block ends (Ray's start, see above)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        self.check()

    def _on_unraisable(self, unraisable: sys.UnraisableHookArgs) -> None:
        if self.received and issubclass(unraisable.exc_type, KeyboardInterrupt):
            return  # ours, remembered: check() raises it again where it cannot be swallowed
        self._previous_unraisable(unraisable)

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a SIGINT came, even one whose exception was swallowed."""
        if self.received:
            raise KeyboardInterrupt

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
            sys.unraisablehook = self._previous_unraisable
            self._installed = False
        if kind is None:
            self.check()
