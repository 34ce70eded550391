"""Render one campaign email: subject, HTML body (CSS inlined) and plain-text body.

Templates live in folders named after the message (``templates/emails/<message>/``)::

    layout.html  layout.txt                shared base layout (``{% extends layout %}``)
    <message>/subject.txt                  one line; whitespace is collapsed
    <message>/body.html  <message>/body.txt
    <message>/body.de.html ...             locale variants: ``.de``, ``.de-AT``, ``.fr`` ...

A user folder (``[templates] folder``) is searched before the built-in one, so a file there
overrides the built-in file of the same relative name. A customer's locale ``de-AT`` is looked up
as ``de-AT``, then ``de``, then the unsuffixed (English) file; the layout follows the locale the
message resolved to, so a German body never sits in an English frame.

Modules: ``context`` (the template variables, pure), ``environment`` (the sandboxed, contained
Jinja environment and its loaders), ``limits`` (time and size budgets), ``inliner`` (CSS
inlining and its skeleton cache), ``errors`` (Jinja failures as ``TemplateError``) and
``renderer`` (the ``Renderer``).
"""

from comms.render.context import (
    DEFAULT_LOCALE,
    LIFECYCLE,
    build_context,
    days_billed_twice,
    default_recipient,
    locale_chain,
    make_branding,
)
from comms.render.environment import NAME_RE
from comms.render.inliner import inline_css
from comms.render.inliner import lxml_text as _lxml_text
from comms.render.inliner import normalise_text as _normalise_text
from comms.render.limits import RenderLimitExceeded
from comms.render.renderer import RenderedEmail, Renderer, TemplateSet

__all__ = [
    "DEFAULT_LOCALE",
    "LIFECYCLE",
    "NAME_RE",
    "RenderLimitExceeded",
    "RenderedEmail",
    "Renderer",
    "TemplateSet",
    "_lxml_text",
    "_normalise_text",
    "build_context",
    "days_billed_twice",
    "default_recipient",
    "inline_css",
    "locale_chain",
    "make_branding",
]
