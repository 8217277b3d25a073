"""Dispatchers move token slots to experts and back (``local``; ``all_to_all`` for EP)."""
from megamoe.dispatch.base import DispatchHandle, Dispatcher
from megamoe.dispatch.all_to_all import AllToAllDispatcher
from megamoe.dispatch.local import LocalDispatcher

__all__ = ["AllToAllDispatcher", "DispatchHandle", "Dispatcher", "LocalDispatcher"]
