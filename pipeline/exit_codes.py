"""Exit codes of a training step, shared by the trainer (jobs.train) and the job wrapper
(pipeline.launch), which reads them to decide about requeueing and gate failures."""

EXIT_OK = 0           # done (the validation gate passed)
EXIT_BAD_INPUT = 2    # missing or malformed input, or GPUs asked for and none found
EXIT_GATE = 3         # the validation gate failed (gate.json says why)
EXIT_NONFINITE = 4    # non-finite loss or gradient (error.pt holds the state before it)
EXIT_PREEMPTED = 75   # stop signal: last.pt saved, requeue to resume
