"""The error a user can fix: the CLI prints its message as one line and exits 1."""


class UserError(Exception):
    """Something the user can fix (bad path, wrong CLIP, bad config, bad request)."""
