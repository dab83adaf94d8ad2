"""Enclave executors and enclave actors (the executor issue builds this package)."""
