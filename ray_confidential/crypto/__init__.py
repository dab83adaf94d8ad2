"""Cryptographic primitives behind sealed objects (hazmat: the public recipes are in ``sealed``)."""
