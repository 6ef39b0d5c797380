"""Low-rank factorization of linear layers (truncated and activation-aware SVD)."""
