"""The ``gactor`` command line: the server entry point and a client over ``gactor.connect``.

``gactor.cli:main`` is the console script; ``cli`` is the click group. Each module adds
its commands to the group when imported:

- ``_app``: the group, its global options, one trio session per command, completion
- ``render``: human units, tables and progress bars (rich)
- ``server``: ``gactor server``
- ``containers``: ping, capacity, create, list, info, metrics, properties, destroy, ...
- ``processes``: run and attach, the --tty session
- ``transfer``: stream-in and stream-out
- ``events``, ``images``: following events; the image store
"""

from __future__ import annotations

from . import containers, events, images, processes, server, transfer
from ._app import CommandError, ConfigurationError, Options, cli, main

__all__ = ["CommandError", "ConfigurationError", "Options", "cli", "main",
           "containers", "events", "images", "processes", "server", "transfer"]
