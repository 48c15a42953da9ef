"""Tasks: how to tokenize, batch, compute the loss and the metrics."""
