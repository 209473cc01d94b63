"""carclf's pipeline library (see README, "Layout")."""
