"""The `ferry` command: thin, arguments -> control layer -> output."""
