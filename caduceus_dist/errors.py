"""What a user can cause, and how a process reports it: the error classes every layer may raise (their
messages name the key or file and the fix) and the exit codes launchers act on (docs/resume.md §4)."""

EXIT_OK = 0
EXIT_FAILURE = 1  # a real failure: never requeue
EXIT_CONFIG_ERROR = 2  # bad recipe, override or command line: fix it and rerun
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: checkpoint saved, requeue me
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C: stopped by the user (a checkpoint saved unless pressed twice)


class ConfigError(ValueError):
    """A bad recipe, override or combination of keys; the message names the key and its source."""
