"""UsageError: what graft-train reports as the user's mistake, in one line, with exit status 2.

Only this type is reported that way (training.cli): any other exception is a
bug and keeps its traceback. A check that knows which flag was wrong names
it; one that does not (an image folder's scan, say) raises without a flag,
and the caller that knows the flag adds it with :meth:`UsageError.naming`.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A flag's value, or a file or environment variable it depends on, is wrong.

    ``flag`` is the option as typed (``--weights``), or None when the raiser does
    not know it. ``str()`` reads like argparse's own errors: ``argument --weights: ...``.
    A ValueError, so that library callers that catch ValueError keep working.
    """

    def __init__(self, flag: str | None, message: str):
        super().__init__(flag, message)
        self.flag = flag
        self.message = " ".join(str(message).split("\n"))

    def __str__(self) -> str:
        return f"argument {self.flag}: {self.message}" if self.flag else self.message

    def naming(self, flag: str) -> UsageError:
        """This error with ``flag`` named, unless it already names one."""
        return self if self.flag else UsageError(flag, self.message)
