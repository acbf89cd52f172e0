"""Hostile inputs for the security tests, generated at test time (no binary files committed)."""
