"""Matching backends: each module registers its entry in `clipdedup.match.core.MATCHERS`;
`clipdedup.match` imports them."""
