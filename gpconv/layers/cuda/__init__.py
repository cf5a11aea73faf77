"""The io block on CUDA: Triton kernels (:mod:`.triton_io`, run where :mod:`.triton_route` says;
triton is optional) and torch's grouped GEMM for bfloat16 (:mod:`.grouped_mm`)."""
