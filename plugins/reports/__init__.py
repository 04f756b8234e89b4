"""Report steps: the spec's example plugin package (plugins/reports/)."""
