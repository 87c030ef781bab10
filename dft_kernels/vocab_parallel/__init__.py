"""Vocab-parallel (tensor-parallel) LM head: every objective over a head whose rows (the vocabulary) are
split over the ranks of a ``torch.distributed`` process group.

Each rank holds a contiguous slice of the vocabulary (the slices in rank order make the whole head;
sizes may differ), the same input and the same global targets.  Per chunk of ``C`` token rows each
rank computes its slice of the logits, pass 1 of the split row kernel (``dft_kernels.backends.split``)
gives per-row partial statistics, one ``all_reduce(MAX)`` of ``[C]`` and one ``all_reduce(SUM)`` of a
packed ``[C, k]`` tensor turn them into the global ones (``row_kernel``), and pass 2 writes this
slice's logits gradient; ``dX`` is all-reduced once per call.  See ``docs/distributed.md``.

Modules: ``shard`` (slice layout, DTensor unwrapping), ``row_kernel`` (the combine step and the
objective epilogue as a row backend), ``autograd`` (the autograd Functions over the chunk drivers of
``dft_kernels.chunked``).  The branch the public functions take is in ``dft_kernels.functional``.
"""

from .row_kernel import VocabParallelRowKernel, packed_columns
from .shard import VocabShard, gather_layout

__all__ = ["VocabParallelRowKernel", "VocabShard", "gather_layout", "packed_columns"]
