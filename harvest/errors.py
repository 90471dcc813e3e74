"""The error the text side of harvest raises for bad input (a config, a path, a corpus)."""


class TextError(ValueError):
    """Bad text-side input: the message is one line naming the problem and the fix."""
