"""The pure half: schedule files in, a validated model out.

YAML reading (:mod:`.yamlsafe`), the JSON Schema (:mod:`.schema`), the loader
(:mod:`.loader`) and the frozen model (:mod:`.model`); durations, cron expressions and the
one fire-time function (:mod:`.firetimes`); the diff of two desired states. Nothing here
does I/O beyond reading the files it is given, runs a process or opens a socket.
"""
