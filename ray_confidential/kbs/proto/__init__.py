"""Protocol buffers of the key broker (``kbs.proto``) and their generated modules (do not edit)."""
