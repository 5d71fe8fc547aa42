"""Tools beside compile and load: calibration, the benchmark, routing counts (expert popularity), demo models."""
