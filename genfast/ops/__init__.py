"""Operator registration (fake implementations, Triton operators) and backend dispatch, one op per module."""
