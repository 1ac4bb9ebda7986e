"""Code shared by the router and the shards: the sans-IO line protocol, name rules, limits,
the router<->shard messages and the room->shard hash. No sockets, no loops, no threads."""
