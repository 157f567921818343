"""Property tests (hypothesis) of the invariants of SPEC §4."""
