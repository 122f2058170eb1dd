"""Triton kernels: forward.py (online-softmax forward), backward.py (delta, dk/dv, dq), bias_grad.py,
decode.py (KV cache); tuning.py picks every launch's tiles."""
