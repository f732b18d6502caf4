"""Helpers for the test suite that are not fixtures: a TCP proxy for network faults."""
