"""Security: mesh key, route signatures, caller authentication (see docs/security.md)."""
