"""One exception type for user-facing problems: a one-line message that names the problem and the fix."""


class CAQError(Exception):
    """A problem with the user's input or environment. The CLI prints it as one line and exits with code 2."""
