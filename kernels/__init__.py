"""Triton kernels, shipped as clipdedup.kernels.

Nothing here is imported at start-up: clipdedup.match registers these kernels behind an
availability check, so a machine without CUDA or Triton never imports them.
"""
