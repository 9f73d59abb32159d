"""Rule audiences: conditions on events and traits, compiled to SQL over the Segment layout.

`parse_rules` reads an audience's `rules:`, `parse_layout_spec` and `reflect_layout` read its
source, `compile_audience` makes the SELECT and `render_sql` shows it with its parameters.
"""

from worker.rules.compiler import AudienceResolver, compile_audience, render_sql
from worker.rules.grammar import Rule, parse_rules, referenced_audiences
from worker.rules.layout import Layout, LayoutSpec, parse_layout_spec, reflect_layout

__all__ = [
    "AudienceResolver",
    "Layout",
    "LayoutSpec",
    "Rule",
    "compile_audience",
    "parse_layout_spec",
    "parse_rules",
    "referenced_audiences",
    "reflect_layout",
    "render_sql",
]
