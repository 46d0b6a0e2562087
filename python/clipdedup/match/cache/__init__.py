"""The match cache (`clipdedup-matches.bin`): its pairs (`matches`), its screen section (`screen`)
and a dedup run's matching through it (`incremental`)."""
