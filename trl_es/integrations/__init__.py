"""Integrations with distributed back-ends; each module imports its back-end lazily."""
