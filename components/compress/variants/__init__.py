"""The registered compression variants, one module each; every module here is imported by the registry."""
