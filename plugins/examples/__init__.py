"""The remaining code examples of the custom-Python-steps page, one module per section."""
