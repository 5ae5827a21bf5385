"""The one exception type for mistakes a user can make in a config or on disk."""


class ConfigError(ValueError):
    """A user-fixable problem: bad override, missing data, impossible episode shape.

    The message is one sentence naming the key, the value and what is allowed. The
    command-line entry points print it and exit non-zero without a traceback.
    """
