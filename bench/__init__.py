"""gactor's benchmark harness: ``python -m bench`` (or ``make bench``).

It starts its own ``gactor server`` (free loopback port, temp depot, own network pool),
times the scenarios in :mod:`bench.scenarios`, prints a table next to the reference
(guardian) figures from ``/work/shared/PERF_NOTES.md``, writes
``bench/results/<timestamp>.json`` and leaves the host as it found it.
"""
