"""``cronfile agent``: the process on each host that holds one connection to the center and
runs what it is sent."""
