"""The benchmark shapes: LM heads of real models (docs/benchmarks.md, Shapes) and small CPU shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    """One problem: ``N`` tokens, hidden size ``H``, vocabulary ``V``, dtype, optional softcap."""

    model: str
    n: int
    h: int
    v: int
    dtype: str = "bf16"
    softcap: Optional[float] = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def name(self) -> str:
        cap = f" cap{self.softcap:g}" if self.softcap is not None else ""
        return f"{self.model} N{self.n} H{self.h} V{self.v} {self.dtype}{cap}"


# (model, H, V, softcap) of the heads named in docs/benchmarks.md, Shapes.
HEADS = [
    ("Llama-3-8B", 4096, 128256, None),
    ("Qwen2.5-7B", 3584, 152064, None),
    ("Qwen2.5-Math-1.5B", 1536, 151936, None),
    ("Gemma-2-2B", 2304, 256000, 30.0),
]
TOKENS = (4096, 16384)

GPU_SHAPES = [Shape(m, n, h, v, "bf16", cap) for (m, h, v, cap) in HEADS for n in TOKENS]
QUICK_SHAPES = [Shape("Llama-3-8B", 4096, 4096, 128256, "bf16")]
# Small enough for a 2-core CPU; the second one exercises softcap.
CPU_SHAPES = [
    Shape("cpu-small", 1024, 256, 32000, "fp32"),
    Shape("cpu-small-softcap", 512, 256, 50000, "fp32", 30.0),
]


def parse_shape(spec: str) -> Shape:
    """``N,H,V[,dtype[,softcap]]`` -> Shape, e.g. ``256,64,4096,fp32`` or ``4096,2304,256000,bf16,30``."""
    parts = [p.strip() for p in spec.split(",")]
    if not 3 <= len(parts) <= 5:
        raise ValueError(f"shape {spec!r}: expected N,H,V[,dtype[,softcap]]")
    try:
        n, h, v = (int(p) for p in parts[:3])
    except ValueError:
        raise ValueError(f"shape {spec!r}: N, H and V must be integers") from None
    dtype = parts[3] if len(parts) > 3 else "bf16"
    if dtype not in DTYPES:
        raise ValueError(f"shape {spec!r}: dtype must be one of {sorted(DTYPES)}")
    cap = float(parts[4]) if len(parts) > 4 else None
    if min(n, h, v) < 1:
        raise ValueError(f"shape {spec!r}: N, H and V must be >= 1")
    return Shape("custom", n, h, v, dtype, cap)
