"""Build script.  Pure Python everywhere: nothing here needs the CUDA toolkit.

(The optional CUDA extension in csrc/ is added to ``ext_modules`` only where a CUDA
build of torch and nvcc exist; see docs/backends.md.)
"""

from setuptools import setup

setup()
