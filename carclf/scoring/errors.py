"""Scoring's error: a problem the user can act on, said in one line."""


class ScoringError(RuntimeError):
    """A problem the user can act on (unreachable server, refused request, unreadable file)."""
