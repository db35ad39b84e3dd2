"""The command edge: argument types, exit codes and the one-line error contract, subprocess sessions, and the small commands (check, check-data, demo)."""
