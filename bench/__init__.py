"""Microbenchmarks of dft_kernels against its peers and the GEMM floor.

Run ``python -m bench`` from the repository root (``--cpu`` for the small CPU shapes,
``--quick`` for one GPU shape).  See ``docs/benchmarks.md`` for what is measured and how.
"""
