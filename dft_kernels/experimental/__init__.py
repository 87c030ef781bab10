"""Paths that have not been measured on a GPU yet.  Each is behind an explicit option, off by
default, with its kernels and tests beside it; it joins the main package once a GPU benchmark
shows what it is worth (docs/design.md, Experimental paths).

* :mod:`.fused_head`: ``fused_head=True``, a Triton logits GEMM that writes the factored gradient.
"""
