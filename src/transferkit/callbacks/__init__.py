"""Callbacks, one concern each."""
