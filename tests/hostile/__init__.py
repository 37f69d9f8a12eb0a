"""Hostile-input tests: their helpers are in tests/support/hostile.py."""
