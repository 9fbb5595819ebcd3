"""Markup that a report section may carry: an allow-list sanitiser for in-process extension HTML.

Only sections returned in process by ``pytest_saecheck_report_sections`` may add markup, and even that markup is
cleaned with `nh3 <https://nh3.readthedocs.io>`_ (bindings to the Rust ``ammonia`` sanitiser): structural and
inline text elements, tables and links only. Everything that can change how the rest of the page looks or where
it goes is removed, content included where it is code (``script``, ``style``): ``meta``, ``link``, ``base``,
``style`` elements and attributes, ``class`` and ``id`` (which could borrow the report's own banner classes),
forms, frames, embedded objects and images. A section read back from a JSON file is never markup: see
:func:`pytest_saecheck.report.html.render_html`.
"""

from __future__ import annotations

import nh3

#: Elements an extension section keeps (text structure, lists, tables, links); everything else is removed.
ALLOWED_TAGS = frozenset(
    {
        "a", "abbr", "b", "blockquote", "br", "caption", "code", "dd", "del", "details", "div", "dl", "dt",
        "em", "h3", "h4", "h5", "h6", "hr", "i", "ins", "kbd", "li", "mark", "ol", "p", "pre", "q", "s",
        "samp", "small", "span", "strong", "sub", "summary", "sup", "table", "tbody", "td", "tfoot", "th",
        "thead", "tr", "u", "ul", "var",
    }
)  # fmt: skip
#: Attributes kept, per element (no ``style``, ``class`` or ``id`` anywhere).
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "abbr": {"title"},
    "td": {"colspan", "rowspan"},
    "th": {"colspan", "rowspan", "scope"},
    "ol": {"start"},
}
#: Link targets kept (a ``javascript:`` or ``data:`` link is dropped).
URL_SCHEMES = frozenset({"http", "https", "mailto"})


def sanitise_html(markup: str) -> str:
    """``markup`` with every element and attribute outside the allow-lists removed (``script`` and ``style``
    with their content); the text of other removed elements is kept, escaped. Links get ``rel="noopener
    noreferrer"``. Idempotent: cleaning clean markup returns it unchanged."""
    return nh3.clean(
        str(markup),
        tags=set(ALLOWED_TAGS),
        attributes={tag: set(names) for tag, names in ALLOWED_ATTRIBUTES.items()},
        url_schemes=set(URL_SCHEMES),
        clean_content_tags={"script", "style"},
        strip_comments=True,
    )
