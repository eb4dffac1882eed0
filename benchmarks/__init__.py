"""Load runs of filtergate against upstream stubs, beside reference proxies.

``python -m benchmarks`` (what ``make bench`` runs) starts a minimal raw upstream stub,
then runs each scenario on loopback (direct to the stub, the reference trio + h11
forwarder, proxy.py, nginx, and filtergate in several configurations), prints one table
with ratios to the direct baseline and to the reference forwarder, and writes the
results as JSON into ``benchmarks/results/``. See ``docs/benchmarks.md``.

Benchmarks are not tests: timing lives here, behaviour in ``tests/``.
"""
