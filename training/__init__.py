"""Training machinery: config, optimizer, schedules, checkpoints, logging, evaluation."""
