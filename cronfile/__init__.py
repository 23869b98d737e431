"""cronfile: cron for a fleet, configured as code."""

__version__ = "0.3.0"
