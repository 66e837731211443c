"""``python -m lynx_compile.kernels``: build the kernel library ahead of time and print its path."""

from .compilation import build

print(build())
