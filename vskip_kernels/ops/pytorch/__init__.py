"""PyTorch backend: the CPU path and the fallback of every op (never builds an N x N matrix)."""
