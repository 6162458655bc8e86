"""Hand-written kernels that XLA lacks, each with an XLA fallback (see gemv.py)."""
