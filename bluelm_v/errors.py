"""User-facing errors: each names the input and what is wrong, and is printed without a traceback."""


class BlueLMVError(Exception):
    """Base class of every error meant for the user (printed as one line by the launcher/CLI)."""


class ConfigError(BlueLMVError, ValueError):
    """A config value is wrong: the message starts with its key path (e.g. ``tiler.alpha``)."""


class UnknownComponentError(ConfigError, KeyError):
    """A component name that no plugin registered."""

    def __str__(self):  # KeyError would quote the message
        return self.args[0] if self.args else ""


class DuplicateComponentError(BlueLMVError):
    """Two plugins registered the same name in one family."""


class PluginLoadError(BlueLMVError):
    """A plugin failed to import (fatal only with ``plugins.strict=true``)."""


class InputError(BlueLMVError, ValueError):
    """A user input (an image, a prompt, a data file) is unusable; the message names it."""


class ContractError(BlueLMVError):
    """A component does not have its family's shape (bluelm_v.types): names the component, its
    plugin and what is missing."""
