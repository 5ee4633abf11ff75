"""``memory.stat`` read from a kept-open descriptor: the working set of an agent group.

The working set is the group's charge less its inactive file cache, as the kubelet counts it
for eviction (cAdvisor's ``container_memory_working_set_bytes``): v1 ``memory.usage_in_bytes``
less ``total_inactive_file``, v2 ``memory.current`` less ``inactive_file``, clamped at 0.
Inactive file pages are clean cache or writeback the kernel takes first when the group nears
its ceiling, so they are no pressure; anonymous memory, tmpfs and recently used cache are.
Shared pages are charged once, to the group that first touched them, so 1,000 processes
of one binary cost one copy of its text, where a sum of their RSS counts it 1,000 times.

v1 lists each counter twice, ``inactive_file`` for the group's own pages and
``total_inactive_file`` with its descendants'; an agent group is a leaf, where the two agree,
and the total is what ``usage_in_bytes`` (hierarchical) is to be compared with.
"""

from __future__ import annotations

import os

# memory.stat is under 1 KB on v1 and about 2 KB on recent v2 kernels: one pread holds it.
_READ_BYTES = 16384


def pread_key(fd: int, key: bytes) -> int | None:
    """The value of ``key`` in the flat keyed file open on ``fd``, re-read from offset 0.

    Only the one line is looked for: ~1 us over the read, against ~10 us for a dict of every
    key. None when the kernel does not list ``key``.
    """
    chunk = os.pread(fd, _READ_BYTES, 0)
    data = b"\n" + chunk  # so that the first line is found like every other
    while len(chunk) == _READ_BYTES:  # a full buffer: there may be more
        chunk = os.pread(fd, _READ_BYTES, len(data) - 1)
        data += chunk
    needle = b"\n" + key + b" "
    at = data.find(needle)
    if at < 0:
        return None
    start = at + len(needle)
    end = data.find(b"\n", start)
    return int(data[start:] if end < 0 else data[start:end])


def working_set(usage_bytes: int, inactive_file_bytes: int | None) -> int:
    """Usage less the inactive file cache; all of usage when the kernel gave no figure."""
    return max(0, usage_bytes - (inactive_file_bytes or 0))
