"""Applications built on hdrq (not part of the installed package)."""
