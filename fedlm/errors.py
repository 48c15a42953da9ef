"""Errors raised on bad user input. Each message names the file, field or client and says what would be valid."""


class FedlmError(Exception):
    """Base class of every error fedlm raises for bad input or a failed client."""


class ConfigError(FedlmError):
    """A run config or an argument is invalid."""


class DatasetError(FedlmError):
    """A dataset is missing, unreadable, empty, or lacks the columns a task needs."""


class NothingLeftError(DatasetError):
    """Encoding left none of a dataset's rows (each too long for `max_length`): a client cannot
    train on it, and scores nothing on it when it is a test split."""


class ModelError(FedlmError):
    """A model is unknown, cannot be loaded, or does not match the federation's model."""


class ClientError(FedlmError):
    """A client failed during a round or sent a malformed update."""


class WireError(FedlmError):
    """Bytes received from another process are not a valid fedlm message."""
