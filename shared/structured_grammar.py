"""How a `StructuredOutput` becomes an xgrammar grammar: one rule for the gateway (which
compiles a request's constraint to refuse a bad one with a 400) and the worker (which masks
tokens with it), so what the gateway accepts is exactly what the worker enforces.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from shared.messages import StructuredOutput

if TYPE_CHECKING:  # the worker and the gateway import xgrammar; this module needs it only for types
    import xgrammar

# An object with any keys, as vLLM compiles json_object: the builtin JSON grammar would
# also let a top-level array through, and clients of json_object parse an object.
ANY_OBJECT = '{"type": "object"}'
# What xgrammar raises for a schema, regex or grammar it cannot compile (its message names why).
COMPILE_ERRORS = (RuntimeError, ValueError, TypeError)


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose language is exactly `choices`: JSON's string escapes are EBNF's."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def compile_output(compiler: xgrammar.GrammarCompiler, so: StructuredOutput) -> xgrammar.CompiledGrammar:
    """`so` compiled by an xgrammar GrammarCompiler (which caches it); raises COMPILE_ERRORS."""
    if so.kind == "json_schema":
        return compiler.compile_json_schema(so.spec, any_whitespace=so.any_whitespace)
    if so.kind == "json_object":
        return compiler.compile_json_schema(ANY_OBJECT, any_whitespace=so.any_whitespace)
    if so.kind == "regex":
        return compiler.compile_regex(so.spec)
    if so.kind == "grammar":
        return compiler.compile_grammar(so.spec)
    if so.kind == "choice":
        return compiler.compile_grammar(choice_grammar(json.loads(so.spec)))
    raise ValueError(f"unknown structured output kind {so.kind!r}")
