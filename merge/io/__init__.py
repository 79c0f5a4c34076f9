"""Model I/O: lazy tensor reading, hub resolution, streaming sharded writing. No arithmetic here."""
