"""Kernels behind the custom ops: a pure-torch reference of each (the CPU path and the test oracle)
and, on CUDA, Triton kernels; ``dispatch`` picks one per call."""
