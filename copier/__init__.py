"""The copier: owns all I/O to the replica (libnbd), the point-in-time keep-aside store, and the
replication session's cycle loop. It uses the reporter's extents, never the B-tree's nodes."""
