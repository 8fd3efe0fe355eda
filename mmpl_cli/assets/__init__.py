"""Model weights that ship with the package (the embedded `tiny` default, Diffusers format)."""
