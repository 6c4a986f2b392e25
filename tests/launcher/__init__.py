"""Tests of the launchers (compile, serve, up, doctor)."""
