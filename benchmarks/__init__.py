"""Load runs of filtergate against upstream stubs, beside reference proxies.

``python -m benchmarks`` (what ``make bench`` runs) starts a minimal raw upstream stub,
then runs each scenario on loopback (direct to the stub, the reference trio + h11
forwarder, proxy.py, nginx, and filtergate in several configurations), prints one table
with ratios to the direct baseline and to the reference forwarder, and writes the
results as JSON into ``benchmarks/results/``. See README.md, "Performance".

proxy.py runs twice, with one worker each: ``proxypy`` is its documented reverse-proxy
route, which fails on keep-alive connections, so its clients send ``Connection: close``;
``proxypy-keepalive`` serves keep-alive clients through ``benchmarks/proxypy_keepalive.py``,
a plugin that keeps one upstream connection per client connection and relays the
response bytes unparsed (less work than a gateway does: the peer to beat). The
"filtergate / proxy.py" target uses the keep-alive row when it was measured.

Benchmarks are not tests: timing lives here, behaviour in ``tests/``.
"""
