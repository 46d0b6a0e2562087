"""Triton kernels (`clipdedup.match.kernels`). Importing a kernel module imports triton: the matching
backends do so only when asked to run one (see `clipdedup.match.triton`)."""
