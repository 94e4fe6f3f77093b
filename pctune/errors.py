"""User-facing errors: the CLI prints these as one line, without a traceback."""


class PctuneError(ValueError):
    """A problem with what the user asked for (a bad name, file, value or setting)."""


class Interrupted(PctuneError):
    """A long command stopped early on Ctrl-C or SIGTERM, its state saved (the message says how to go on)."""

    def __init__(self, stopped: str, resume_hint: str | None = None, *, rerun: bool = False) -> None:
        self.stopped = stopped
        self.rerun = rerun  # the same command continues it (promote, sync: finished work is skipped)
        super().__init__(f"{stopped}; continue it with `{resume_hint}`" if resume_hint else stopped)

    def resume_message(self, argv: list[str]) -> str:
        """The message with the exact command to continue: ``argv`` (the interrupted command's own
        arguments, flags included) with ``--resume`` instead of ``--overwrite``, or ``argv`` itself for
        a command that a rerun continues (``rerun``)."""
        import shlex

        args = list(argv)
        if not self.rerun:
            args = [a for a in argv if a != "--overwrite"]
            if "--resume" not in args:
                args.append("--resume")
        return f"{self.stopped}; continue it with `pctune {shlex.join(args)}`"


#: errno values that only a write produces (no space, quota, file too large, read-only file system)
_WRITE_ERRNOS = {"ENOSPC", "EDQUOT", "EFBIG", "EROFS"}

#: file name patterns -> what pctune (or Ray Tune, inside a run directory) writes there
_WRITTEN = (
    ("result.json", "a trial's results, written by Ray Tune"),
    ("experiment_state", "Ray Tune's experiment state"),
    ("searcher-state", "the searcher's state"),
    ("tune-state", "the searcher's state snapshot"),
    ("params.", "a trial's configuration, written by Ray Tune"),
    ("leaderboard", "the leaderboard"),
    ("best.toml", "the best configuration"),
    ("references.json", "the reference scores"),
    ("job.json", "the job record"),
    ("tracking.json", "the MLflow identity of the search"),
    ("summary", "the search summary"),
    ("shards", "a finished shard's result"),
    (".pt", "a checkpoint"),
    (".db", "the MLflow tracking store"),
    ("mlruns", "MLflow artifacts"),
)


def write_error(exc: OSError) -> str | None:
    """``cannot write PATH (WHAT): REASON`` for an OSError that a failed write raises (a full disk, a
    quota, a read-only file system); None for any other OSError."""
    import errno

    if errno.errorcode.get(exc.errno or 0) not in _WRITE_ERRNOS:
        return None
    path = exc.filename or getattr(exc, "pctune_path", None)
    what = next((text for pattern, text in _WRITTEN if path and pattern in str(path)), "a file")
    reason = exc.strerror or str(exc)
    return f"cannot write {path} ({what}): {reason}" if path else f"cannot write ({what}): {reason}"
