"""The published PAT code (the reference): converting its state onto pat-hf's and checking against its fixtures."""
