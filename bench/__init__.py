"""Benchmarks of the sidecar and the exchange server, each against a baseline of the same run.

``make bench`` (``python -m bench``) prints one table; docs/benchmarks.md records and discusses
it. See ``bench.run`` for the order of things and ``bench.figures`` for each figure.
"""
