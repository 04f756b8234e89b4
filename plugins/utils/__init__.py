"""Helpers shared across jobs (the spec's "Reusing functions across jobs")."""
