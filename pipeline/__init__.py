"""Orchestration: configs, the step DAG, executors (local, slurm), run state, resume, tracking."""
