"""User-facing errors: the CLI prints these as one line, without a traceback."""


class PctuneError(ValueError):
    """A problem with what the user asked for (a bad name, file, value or setting)."""
