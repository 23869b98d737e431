"""What a center keeps on disk: the run ledger, the applied schedule files, and the
queries that read them back (``status``, ``runs``)."""
