"""The io block's CPU kernels: the C extension (``_native.c``), its tensor-level wrappers
(:mod:`.native`) and the eager dispatcher that picks a kernel per call (:mod:`.dispatch`)."""
