"""The CPU emulator of the CUDA kernels (fused_attn_emulator.h) and the builder of their emulated
extension (build.py)."""
