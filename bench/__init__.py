"""Benchmarks of the supervisor daemon, each figure beside a baseline measured in the same run.

``python -m bench`` (or ``make bench``) runs them all; ``python -m bench overhead leak`` runs
some; ``--quick`` is a small smoke run. The daemon is driven only through its public
interfaces (the ``daemon`` command, the control socket, the log files), so the suite measures
whatever daemon is installed.
"""

from __future__ import annotations
