"""Screen-then-verify for models whose rows carry a check part (`builtin:dct`): the `Verifier`
(`verifier`), the row-store path (`store`) and `builtin:dct`'s check (`warp_check`)."""
