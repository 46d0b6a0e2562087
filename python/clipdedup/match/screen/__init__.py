"""Screens: rounding-error bounds, the principal-subspace projection, the blocked torch screens
and a row store's screening operands."""
