"""Benchmark harness: an llmperf-style load generator and programmatic sim/router stacks."""
