"""Benchmarks of every op against its peers, shared by bench/ and `genfast bench`."""
