"""The parts of bench/gpu_check.py: each a list of checks run under one overall deadline."""
