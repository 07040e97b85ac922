"""What runs inside a job: models, losses, the training loop, audit, generation, evaluation."""
