"""The templates' error type (its own module so every template module can raise it)."""

from tinytune.errors import TinytuneError


class TemplateError(TinytuneError, ValueError):
    """A conversation the template cannot render (e.g. a role it has no format for)."""
