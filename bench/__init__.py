"""Benchmarks for koala-middleware: ``python3 scripts/dev.py bench`` (entry point ``bench/run.py``).

Every number is a ratio measured in one run: the same app with and without the middleware,
interleaved round by round, medians over the rounds. Absolute times depend on the machine;
the ratios are what the README quotes.
"""
