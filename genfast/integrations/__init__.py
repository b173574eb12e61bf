"""Drop-in replacements for classes of other libraries (optional dependencies, imported on use)."""
