"""HTTP handlers, one module per function. Each is thin: validate → one DB call → answer."""
