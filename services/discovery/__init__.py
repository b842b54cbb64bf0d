"""Service discovery: which worker endpoints exist. Backends: ``static`` (addresses from config), ``consul``."""
