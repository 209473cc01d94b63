"""The deploy step's error: a bad parameter or a failed deployment, said in one line."""


class DeployError(Exception):
    """A bad parameter or a failed deployment; the message is one line."""
