"""Pipeline: the Faust app (records, topics, agents, tables), sinks, the web API and the CLI.

Never protocol bytes, never per-element Python loops on a hot path.
"""
