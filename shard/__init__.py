"""A shard: a process that owns the rooms hashing to it (members, sequence numbers and
history) and applies the router's command batches to them. See :mod:`shard.core`."""
