"""Shared pytest configuration for nubis's test tiers."""
