"""User-facing errors: the CLI prints these as one line, without a traceback."""


class PctuneError(ValueError):
    """A problem with what the user asked for (a bad name, file, value or setting)."""


class Interrupted(PctuneError):
    """A long command stopped early on Ctrl-C or SIGTERM, its state saved (the message says how to go on)."""

    def __init__(self, stopped: str, resume_hint: str | None = None) -> None:
        self.stopped = stopped
        super().__init__(f"{stopped}; continue it with `{resume_hint}`" if resume_hint else stopped)

    def resume_message(self, argv: list[str]) -> str:
        """The message with the exact command to continue: ``argv`` (the interrupted command's own
        arguments, flags included) with ``--resume`` instead of ``--overwrite``."""
        import shlex

        args = [a for a in argv if a != "--overwrite"]
        if "--resume" not in args:
            args.append("--resume")
        return f"{self.stopped}; continue it with `pctune {shlex.join(args)}`"
