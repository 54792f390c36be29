"""Which server gets each balance call: model, planner and rules, cycle, executor, leader fence."""
