"""Structured outputs at the gateway: every spelling a client may use (OpenAI's
`response_format`, vLLM's `structured_outputs` and its older `guided_*` fields) turned into
one `shared.messages.StructuredOutput`, checked by compiling it with xgrammar against the
served tokenizer, so an invalid schema, regex or grammar is a 400 naming its field. The
worker compiles it again (cached) to build its token masks.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jsonschema  # type: ignore[import-untyped]  # ships no types; its stubs are no dependency

from services.gateway.errors import bad_request
from shared.messages import StructuredOutput
from shared.structured_grammar import COMPILE_ERRORS, choice_grammar, compile_output

if TYPE_CHECKING:
    import xgrammar as xgr  # imported where used: the first constrained request loads it

# vLLM's structured_outputs keys; the two it has and Conveyor does not are refused.
_SO_KINDS = {
    "json": "json_schema",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "json_object": "json_object",
}
_SO_FLAGS = ("disable_any_whitespace", "disable_additional_properties")
_SO_UNSUPPORTED = ("whitespace_pattern", "structural_tag")
_GUIDED = {
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
# xgrammar ignores these keywords (with a warning): the output would not be held to them.
_IGNORED_BY_XGRAMMAR = {
    "integer": ("multipleOf",),
    "number": ("multipleOf",),
    "array": ("uniqueItems", "contains", "minContains", "maxContains"),
}


@dataclass(frozen=True)
class Constraint:
    """A request's output constraint and the field it came from (named in any 400)."""

    field: str
    output: StructuredOutput


def request_constraint(body: Any) -> Constraint | None:
    """The one constraint a completion or chat body asks for (None: free text); two or
    more are a 400 naming them. Each is parsed and checked here (no tokenizer needed)."""
    found = [
        c
        for c in (
            _response_format(body.response_format),
            _structured_outputs(body.structured_outputs),
            *_guided(body),
        )
        if c is not None
    ]
    if len(found) > 1:
        names = ", ".join(c.field for c in found)
        raise bad_request(f"only one output constraint per request; this one sets {names}", found[1].field)
    if found:
        check_syntax(found[0])
    return found[0] if found else None


def json_schema_constraint(schema: Any, field: str) -> Constraint:
    """A JSON-schema constraint (e.g. a tool's parameters), checked; for callers beyond this module."""
    c = Constraint(field, StructuredOutput("json_schema", _schema_text(schema, field)))
    check_syntax(c)
    return c


# ---- the spellings ----------------------------------------------------------------------
def _response_format(rf: dict | None) -> Constraint | None:
    if rf is None:
        return None
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("response_format", StructuredOutput("json_object"))
    if kind != "json_schema":
        raise bad_request(
            f"response_format.type: must be 'text', 'json_object' or 'json_schema', not {kind!r}",
            "response_format.type",
        )
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise bad_request(
            "response_format.json_schema: must be an object with a 'schema' (and a 'name')",
            "response_format.json_schema",
        )
    field = "response_format.json_schema.schema"
    return Constraint(field, StructuredOutput("json_schema", _schema_text(spec["schema"], field)))


def _structured_outputs(so: dict | None) -> Constraint | None:
    if so is None:
        return None
    for name in _SO_UNSUPPORTED:
        if so.get(name) is not None:
            raise bad_request(f"structured_outputs.{name} is not supported", f"structured_outputs.{name}")
    unknown = (
        set(so) - set(_SO_KINDS) - set(_SO_FLAGS) - set(_SO_UNSUPPORTED) - {"_backend", "_backend_was_auto"}
    )
    if unknown:
        raise bad_request(
            f"structured_outputs: unknown keys {sorted(unknown)}; known: {sorted(_SO_KINDS)}",
            "structured_outputs",
        )
    set_kinds = [k for k in _SO_KINDS if so.get(k) not in (None, False)]
    if len(set_kinds) != 1:
        raise bad_request(
            f"structured_outputs: set exactly one of {', '.join(_SO_KINDS)} (here {len(set_kinds)})",
            "structured_outputs",
        )
    key = set_kinds[0]
    field = f"structured_outputs.{key}"
    value = so[key]
    if key == "json" and so.get("disable_additional_properties"):
        value = _no_additional_properties(_schema_value(value, field))
    return Constraint(field, _output(_SO_KINDS[key], value, field))


def _guided(body: Any) -> list[Constraint]:
    if body.guided_whitespace_pattern is not None:
        raise bad_request("guided_whitespace_pattern is not supported", "guided_whitespace_pattern")
    if body.guided_decoding_backend not in (None, "xgrammar", "auto"):
        raise bad_request(
            f"guided_decoding_backend: only 'xgrammar' is available, not {body.guided_decoding_backend!r}",
            "guided_decoding_backend",
        )
    return [
        Constraint(name, _output(kind, getattr(body, name), name))
        for name, kind in _GUIDED.items()
        if getattr(body, name) is not None
    ]


def _output(kind: str, value: Any, field: str) -> StructuredOutput:
    if kind == "json_schema":
        return StructuredOutput(kind, _schema_text(value, field))
    if kind == "json_object":
        return StructuredOutput(kind)
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
            raise bad_request(f"{field}: must be a non-empty list of strings", field)
        return StructuredOutput(kind, json.dumps(value, ensure_ascii=False))
    if not isinstance(value, str) or not value:
        raise bad_request(f"{field}: must be a non-empty string", field)
    return StructuredOutput(kind, value)


def _schema_value(value: Any, field: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise bad_request(f"{field}: not valid JSON: {e}", field) from None
    return value


def _schema_text(value: Any, field: str) -> str:
    schema = _schema_value(value, field)
    if not isinstance(schema, (dict, bool)):
        raise bad_request(f"{field}: a JSON schema is an object, not {type(schema).__name__}", field)
    return json.dumps(schema, ensure_ascii=False)


def _no_additional_properties(schema: Any) -> Any:
    """vLLM's disable_additional_properties: every object schema closed to other keys."""
    if isinstance(schema, list):
        return [_no_additional_properties(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _no_additional_properties(v) for k, v in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out["additionalProperties"] = False
    return out


# ---- checks -----------------------------------------------------------------------------
def check_syntax(c: Constraint) -> None:
    """Parses the constraint as the worker will (xgrammar, no tokenizer): a 400 naming the field."""
    import xgrammar as xgr

    so = c.output
    if so.kind == "json_schema":
        _check_schema(json.loads(so.spec), c.field)
    if so.kind == "regex" and "\x00" in so.spec:
        raise bad_request(f"{c.field}: must not contain a NUL character", c.field)
    try:
        if so.kind == "json_schema":
            xgr.Grammar.from_json_schema(so.spec, any_whitespace=so.any_whitespace)
        elif so.kind == "regex":
            xgr.Grammar.from_regex(so.spec)
        elif so.kind == "grammar":
            xgr.Grammar.from_ebnf(so.spec)
        elif so.kind == "choice":
            xgr.Grammar.from_ebnf(choice_grammar(json.loads(so.spec)))
    except COMPILE_ERRORS as e:
        raise bad_request(f"{c.field}: {_xgrammar_message(e)}", c.field) from None


def _check_schema(schema: Any, field: str) -> None:
    # A "$schema" that is not a string names no draft: the default's rules apply (and flag it).
    named = isinstance(schema, dict) and isinstance(schema.get("$schema"), str)
    validator = (
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        if named
        else jsonschema.Draft202012Validator
    )
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise bad_request(
            f"{field}: not a valid JSON schema{f' at {where}' if where else ''}: {e.message}", field
        ) from None
    unsupported = _ignored_keywords(schema)
    if unsupported:
        raise bad_request(f"{field}: xgrammar cannot enforce {', '.join(sorted(unsupported))}", field)


def _ignored_keywords(schema: Any) -> set[str]:
    if isinstance(schema, list):
        return set().union(*(_ignored_keywords(s) for s in schema)) if schema else set()
    if not isinstance(schema, dict):
        return set()
    types = schema.get("type")
    types = set(types) if isinstance(types, list) else {types}
    found = {k for t in types for k in _IGNORED_BY_XGRAMMAR.get(t, ()) if k in schema}
    return found.union(*(_ignored_keywords(v) for v in schema.values() if isinstance(v, (dict, list))))


def _xgrammar_message(e: Exception) -> str:
    """xgrammar's message without its '[time] /project/cpp/file.cc:123: ' prefix."""
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(e)).strip()


class GrammarChecker:
    """Compiles constraints against the served tokenizer (xgrammar's compiler caches each
    grammar), off the event loop; what compiles here compiles in the worker."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()

    async def check(self, c: Constraint | None) -> None:
        if c is not None:
            await asyncio.to_thread(self.compile, c)

    def compile(self, c: Constraint) -> None:
        compiler = self._get_compiler()
        try:
            compile_output(compiler, c.output)
        except COMPILE_ERRORS as e:
            raise bad_request(f"{c.field}: {_xgrammar_message(e)}", c.field) from None

    def _get_compiler(self) -> xgr.GrammarCompiler:
        # Built on first use: TokenizerInfo reads the whole vocabulary (about a second for 150k tokens).
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler
