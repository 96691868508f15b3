"""Differential privacy: the accountant (sampled Gaussian releases composed with RDP), central DP (per-client
clipping and counter-based Gaussian noise that shard exactly) and client DP-SGD (Opacus)."""
