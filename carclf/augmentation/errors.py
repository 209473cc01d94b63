"""The error every bad augmentation parameter or failed augmentation job raises."""


class AugmentError(ValueError):
    """Bad parameters or a failed augmentation job; the message names the problem."""
