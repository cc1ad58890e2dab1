"""The registered deploy targets, one module each (plus their helpers); every module here is imported by the registry."""
