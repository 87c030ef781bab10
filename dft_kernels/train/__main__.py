"""``python -m dft_kernels.train`` (also what ``torchrun -m dft_kernels.train`` runs on every rank)."""

import sys

from .cli import main

sys.exit(main())
