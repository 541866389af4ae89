"""[6] Optimisers, parameter groups and schedules."""
