"""Triton kernels: forward.py (online-softmax forward) and backward.py (delta, dk/dv, dq)."""
