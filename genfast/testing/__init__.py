"""What the tests, `genfast check` and the benchmarks share: per-op sample inputs and tolerances."""
