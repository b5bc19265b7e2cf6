"""Prompt-template registry: ``get_template(name)``.

Names: the built-ins, ``hf``, and the 34 MindSpeed ``prompt_type`` names rendered from their slot
table (``mindspeed:NAME``; a name only MindSpeed has also works bare, see ``mindspeed.py``). A template
can also be given as a dict of :class:`ChatTemplate` fields, so adding one is a few lines of
config or a :func:`register_template` call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from tinytune.datasets.templates.builtin import BUILTIN_TEMPLATES
from tinytune.datasets.templates.hf import HFChatTemplate, render_jinja
from tinytune.datasets.templates.mindspeed import MindSpeedTemplate, mindspeed_table, mindspeed_template
from tinytune.datasets.templates.template_spec import ChatTemplate, Segment, TemplateError, segments_to_text

_REGISTRY: dict[str, ChatTemplate] = dict(BUILTIN_TEMPLATES)


def mindspeed_prompt_types() -> dict[str, dict]:
    """MindSpeed ``prompt_type`` name -> its slot-table entry (see ``templates.mindspeed``)."""
    return mindspeed_table()


def register_template(template: ChatTemplate) -> None:
    """Adds (or replaces) a template in the registry under ``template.name``."""
    _REGISTRY[template.name] = template


def template_names() -> list[str]:
    """All names :func:`get_template` accepts."""
    return sorted(set(_REGISTRY) | set(mindspeed_table()) | {"hf"})


def get_template(name: str | Mapping | ChatTemplate | HFChatTemplate, **kwargs):
    """Looks up a prompt template.

    Args:
        name: a registry name, a MindSpeed ``prompt_type`` name, ``"hf"`` (the model's own Jinja
            template), a dict of :class:`ChatTemplate` fields, or a template object.
        **kwargs: for ``"hf"``: ``chat_template`` (Jinja text or path), ``end_of_turn``; for the
            others: :class:`ChatTemplate` fields to override (e.g. ``default_system``).

    Raises:
        TemplateError: for an unknown name.
    """
    if isinstance(name, (ChatTemplate, HFChatTemplate, MindSpeedTemplate)):
        return name
    if isinstance(name, Mapping):
        fields = dict(name)
        fields.setdefault("name", "custom")
        if "stop_strings" in fields:
            fields["stop_strings"] = tuple(fields["stop_strings"])
        return ChatTemplate(**fields)
    if name == "hf":
        return HFChatTemplate(**kwargs)
    if name.startswith("mindspeed:") or (name not in _REGISTRY and name in mindspeed_table()):
        return mindspeed_template(name.removeprefix("mindspeed:"), kwargs.get("default_system"))
    kwargs = {k: v for k, v in kwargs.items() if k not in ("chat_template", "end_of_turn")}
    if name in _REGISTRY:
        t = _REGISTRY[name]
    else:
        raise TemplateError(
            f"unknown template {name!r}; choose from {', '.join(template_names())}, or "
            "use 'hf' to render the model's own chat template"
        )
    return dataclasses.replace(t, **kwargs) if kwargs else t


__all__ = [
    "ChatTemplate",
    "HFChatTemplate",
    "Segment",
    "TemplateError",
    "get_template",
    "mindspeed_prompt_types",
    "register_template",
    "render_jinja",
    "segments_to_text",
    "template_names",
]
