"""fedlm's benchmark scripts (`python -m benchmarks.all`); each also runs alone."""
