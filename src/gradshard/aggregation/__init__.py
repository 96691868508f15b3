"""Aggregation: the round driver (validate, plan, run, publish), the aggregation functions, compare."""
