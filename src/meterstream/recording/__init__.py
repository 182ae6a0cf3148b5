"""Recorded traffic: the recording proxy, pcap export, the LCL converter and capture replay.

Tools around the collectors, not part of them: they speak bytes over TCP to collectors exactly as
terminals do (docs/recording.md). The capture file itself is `meterstream.capture`.
"""
