"""Cost and capacity: prices as data, the cost, memory and latency model, the planner."""
