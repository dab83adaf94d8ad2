"""Attestation-gated placement and node pools (the placement issue builds this package)."""
