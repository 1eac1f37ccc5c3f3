"""peftserve benchmarks: load generation, baselines, metrics and reports (``make bench``).

Run ``python -m bench.run --help``. Everything targets 127.0.0.1 only and is bounded in request
count and time; see ``docs/benchmarks.md`` for the method.
"""
