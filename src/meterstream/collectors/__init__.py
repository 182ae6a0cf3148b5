"""Collectors: protocol codecs (sans-I/O), transports, the poll scheduler, command execution.

Never holds money, tariffs or Kafka internals.
"""
