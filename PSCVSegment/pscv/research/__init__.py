"""Research code (the ACDC benchmark and its data preparation): installed with pscv, not shipped in Slicer."""
