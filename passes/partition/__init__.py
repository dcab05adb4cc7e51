"""Partitioning across devices: the cost model now; tensor/pipeline parallel and the planner next."""
