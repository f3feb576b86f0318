"""Benchmarks: ``run.py`` (command line), ``harness.py`` (clocks, memory, paired runs, rows, table, plot),
``inference.py`` and ``training.py`` (the measurements), ``data.py`` (the data pipeline suite)."""
