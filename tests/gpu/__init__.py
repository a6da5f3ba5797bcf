"""Equality checks that compute differently on CUDA (bf16 kernels, SDPA's fused kernels, bitsandbytes' CUDA 4-bit
kernels). Skipped without a CUDA device; ``LT_GPU_TESTS_ON_CPU=1`` runs them on the CPU to check their logic."""
