"""The GPU check (docs/gpu.md, `make gpu-check`): every part of the GPU path validated and
measured in one run on a lent CUDA machine, and the wheels that machine lacks."""
