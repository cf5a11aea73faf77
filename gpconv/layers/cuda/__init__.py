"""The io block on CUDA: torch's grouped GEMM for bfloat16 (:mod:`.grouped_mm`)."""
