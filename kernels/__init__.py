"""Triton kernels, installed as `clipdedup.kernels` (source: `kernels/` at the repository root).
Importing a kernel module imports triton: the matching backends do so only when asked to run one
(see `clipdedup.match.backends.triton`)."""
