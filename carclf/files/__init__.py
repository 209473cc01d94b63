"""Files on disk: atomic writes and cheap identities of inputs."""
