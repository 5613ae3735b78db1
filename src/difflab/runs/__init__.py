"""End-to-end runs (train → sample → report) that the CLI and notebooks call."""
