"""Owns the exception hierarchy. Every error a user can cause is an AtlasError whose
message is one line saying what is wrong and what to do; the CLI prints it as `Error: …`."""


class AtlasError(Exception):
    """A problem the user can fix (bad flag, bad config, unreadable file, unreachable server)."""


class ConfigError(AtlasError):
    """The configuration file or an option has an unknown key or a bad value."""


class ModelError(AtlasError):
    """A model file is missing, unreadable, of an unknown version, or not a model."""


class SourceError(AtlasError):
    """A mail source (file, directory, Maildir, mbox, index.csv) cannot be read."""


class StoreError(AtlasError):
    """The verdict database cannot be opened, migrated or written."""
