"""``nbdrep receive``: the replica side, which makes each cycle visible only at its commit."""
