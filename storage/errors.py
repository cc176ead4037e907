"""Errors every layer may raise, defined below all of them."""

from __future__ import annotations


class SystemicError(RuntimeError):
    """The run cannot go on (output not writable, a backend that cannot load).

    Unlike a reject, it fails the flow; its message says what to do.
    """
