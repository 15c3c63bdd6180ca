"""The benchmarks behind `sit-ext bench` and bench/*.py."""
