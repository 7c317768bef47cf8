"""The one exception type users see: the CLI prints it as a single line (what, where, how to fix)."""


class IteritError(Exception):
    """A problem with the user's input, config or environment. str(e) is the whole message."""


class RowError(Exception):
    """One input row cannot be used. `reason` is a word from data.REJECT_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
