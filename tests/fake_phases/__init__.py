"""Stand-in phase programs that the controller tests run instead of the real ones."""
