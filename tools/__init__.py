"""Tooling around the system, not part of it and not installed: the GPU check (gpu_check/)
and the real models the tests and benchmarks serve (real_models.py)."""
