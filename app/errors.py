"""The app's error for bad command-line usage; every module of app/ may import it (it imports none of them)."""
from __future__ import annotations

from dstudio.distill.core.errors import UserError


class UsageError(UserError):
    """Bad command-line usage: printed as one line, exit code 2 (like every distill.core.errors.UserError)."""
