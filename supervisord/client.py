"""The Python client of CONTRACT.md: ``from supervisord.client import Client, AsyncClient``.

The implementation lives in ``supervisord.control.client``; this module is the contract's
stable import path, so the package can be arranged without breaking callers.
"""

from __future__ import annotations

from supervisord.control.client import AsyncClient, Client, resolve_socket
from supervisord.core.errors import SupervisordError

__all__ = ["AsyncClient", "Client", "SupervisordError", "resolve_socket"]
