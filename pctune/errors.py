"""User-facing errors: the CLI prints these as one line, without a traceback."""

import os


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


def write_error(error: BaseException) -> str | None:
    """``cannot write PATH (WHAT): REASON`` for an OSError that a failed write raises (a full disk, a
    quota, a read-only file system), also when it is the cause of another error (Ray Tune wraps the
    errors of its own writes); None for any other error."""
    exc = _write_oserror(error)
    if exc is None:
        return None
    path = exc.filename
    tail = "/".join(str(path).replace(os.sep, "/").split("/")[-2:]) if path else ""  # the file and its folder
    what = next((text for pattern, text in _WRITTEN if pattern in tail), "a file")
    if path and os.path.isdir(path):
        what = "a file in this folder"
    reason = exc.strerror or str(exc)
    return f"cannot write {path} ({what}): {reason}" if path else f"cannot write ({what}): {reason}"


def _write_oserror(error: BaseException | None) -> OSError | None:
    """The write's OSError in ``error``'s chain of causes and contexts, if there is one."""
    import errno

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and errno.errorcode.get(error.errno or 0) in _WRITE_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None
