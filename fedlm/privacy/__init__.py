"""Privacy beyond keeping raw text on the clients: accounting for differential privacy."""
