"""Fused ops of vatt_fast (installed as ``vatt_fast.kernels``)."""
