"""Re-execution of recorded runs: planning jobs, executors, workers and code-version propagation."""
