"""Launchers that replace the Neuron DI tutorial's copy-pasted shell scripts."""
