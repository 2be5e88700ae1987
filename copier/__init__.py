"""The copier: owns all I/O to the replica (one C engine over libnbd, per-request retries) and
the point-in-time keep-aside store. It takes the reporter's extents and never decides when
cycles start or commit: that is ``replication``'s job."""
