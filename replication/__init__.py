"""The replication controller: the cycle state machine (``machine``, pure logic) and the thin
driver that performs its actions with threads and the real parts (``driver``).

A package of its own, not part of ``copier/``: the copier owns I/O to the replica and must not
decide when cycles start or commit, and the controller must stay testable without I/O.
"""
