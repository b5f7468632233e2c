"""One exception type for every user-facing failure, so users see a clean message."""


class KvbenchError(RuntimeError):
    """A problem the user can fix (bad config, missing weights, corrupt shard, ...)."""
