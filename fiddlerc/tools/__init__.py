"""Tools beside compile and load: calibration, the benchmark, routing-count profiling, demo models."""
