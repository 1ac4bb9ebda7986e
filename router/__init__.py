"""The router: one asyncio process that owns the client connections and sessions, sends each
room's commands to the shard that owns the room, and fans the shards' events out."""
