"""Fuzz harness for every reader of untrusted files (see README.md in this folder)."""
