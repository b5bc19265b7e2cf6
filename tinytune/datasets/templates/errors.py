"""The templates' error type (its own module so every template module can raise it)."""


class TemplateError(ValueError):
    """A conversation the template cannot render (e.g. a role it has no format for)."""
