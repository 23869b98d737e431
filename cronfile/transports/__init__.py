"""How a run reaches a host: the :class:`~.executor.Executor` seam and its implementations
(local processes, SSH, and agents over TCP through the hub and its wire protocol)."""
