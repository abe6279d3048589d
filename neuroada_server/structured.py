"""Structured outputs: generation held to a JSON schema, any JSON object, a regex, a list of choices
or an EBNF grammar (OpenAI's `response_format`, vLLM's `structured_outputs`).

xgrammar compiles a constraint against the tokenizer's vocabulary once (its compiler caches what it
compiled); each constrained row then has a matcher that follows its tokens and, before each
sampling, gives the tokens that keep its text inside the grammar. The end-of-sequence tokens are
allowed only where the grammar is complete, so a constrained row ends when its text does.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import Literal

import jsonschema
import torch
import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

StructureKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
MAX_COMPILED_BYTES = 64 << 20  # the compiler's cache of compiled grammars
MAX_SCHEMA_DEPTH = 64  # objects and arrays nested in a schema's JSON (the meta-schema check recurses per level)


@dataclass(frozen=True)
class Structure:
    """What a request's text must be: `spec` is the JSON schema (as JSON text), the regex, the
    choices (a JSON list of strings) or the EBNF grammar; unused for any JSON object."""

    kind: StructureKind
    spec: str = ""


@dataclass(frozen=True)
class Grammar:
    """A structure compiled against one tokenizer's vocabulary: a request's rows each follow it
    with a `Constraint` of their own."""

    structure: Structure
    compiled: xgr.CompiledGrammar = field(compare=False, repr=False)


class StructureError(ValueError):
    """A structure that does not compile (an unsupported schema, a malformed regex or grammar)."""


class Grammars:
    """Compiles structures for one model's tokenizer; the vocabulary's tables are built at the first
    compile, not when the server starts."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_ids: set[int]):
        self._tokenizer, self._vocab_size, self._stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()

    def compile(self, structure: Structure) -> Grammar:
        """Raises StructureError, with xgrammar's reason, for a structure it cannot compile."""
        compiler = self._compiler or self._build()
        if structure.kind == "json_schema":
            check_json_schema(structure.spec)
        try:
            if structure.kind == "json_schema":
                compiled = compiler.compile_grammar(json_schema_grammar(structure.spec))
            elif structure.kind == "json_object":  # any object, with any keys and values
                compiled = compiler.compile_grammar(json_schema_grammar('{"type": "object"}', strict=False))
            elif structure.kind == "regex":
                compiled = compiler.compile_regex(structure.spec)
            elif structure.kind == "choice":
                compiled = compiler.compile_grammar(choice_grammar(json.loads(structure.spec)))
            else:
                compiled = compiler.compile_grammar(structure.spec)
        except RuntimeError as e:
            raise StructureError(_reason(e)) from None
        except UnicodeDecodeError:  # xgrammar's message cut a character of the text in two
            raise StructureError("it does not parse (xgrammar's message about it is not valid UTF-8)") from None
        return Grammar(structure, compiled)

    def _build(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_ids
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=MAX_COMPILED_BYTES)
            return self._compiler


def check_json_schema(schema: str) -> None:
    """Raises StructureError unless `schema` is a JSON schema by its meta-schema (its `$schema`'s
    draft, else 2020-12): xgrammar compiles some invalid ones (an empty `anyOf` as an empty text)."""
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError as e:
        raise StructureError(f"the schema is not JSON: {e}") from None
    except RecursionError:
        parsed = None
    if parsed is None or _depth(parsed) > MAX_SCHEMA_DEPTH:
        raise StructureError(f"the schema nests objects and arrays deeper than {MAX_SCHEMA_DEPTH} levels")
    if not isinstance(parsed, (dict, bool)):
        raise StructureError(f"a schema is an object or a boolean, not {type(parsed).__name__}")
    try:
        jsonschema.validators.validator_for(parsed).check_schema(parsed)
    except jsonschema.SchemaError as e:
        where = "/".join(map(str, e.absolute_path))
        raise StructureError(f"invalid schema{f' at {where}' if where else ''}: {e.message}") from None


def _depth(value) -> int:
    """How deep objects and arrays nest in a parsed JSON value (0: a scalar), without recursing."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        value, depth = todo.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            todo += [(child, depth + 1) for child in children]
    return deepest


# What xgrammar (0.2.8 and 0.2.9) lets a JSON string hold, as its grammars write it, and what we hold it to.
# A string with a minLength or maxLength is a repetition of the first class, which lets raw control
# characters in: invalid JSON, `json.loads` refuses it (mlc-ai/xgrammar#800). Both classes let
# UTF-8-encoded surrogates in (U+D800-U+DFFF are no characters: each decodes to three U+FFFD). Escapes
# stay out of a bounded string, as in xgrammar: a repetition of an alternative (a character or an
# escape) loses xgrammar's precomputed token masks, each mask then checked over the whole vocabulary.
_CHARACTER = r"[^\0-\x1f\"\\\uD800-\uDFFF]"
_STRING_CHARACTERS = {r"[^\"\\\r\n]": _CHARACTER, r"[^\0-\x1f\"\\\r\n]": _CHARACTER}


def json_schema_grammar(schema: str, strict: bool = True) -> str:
    """The EBNF grammar of the JSON texts `schema` allows, with compact separators (", " and ": "):
    free whitespace lets a small model pad its object with newlines until max_tokens runs out.
    `strict`: properties and items the schema does not name are not allowed."""
    grammar = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=strict))
    for xgrammars, ours in _STRING_CHARACTERS.items():
        grammar = grammar.replace(xgrammars, ours)
    return grammar


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose texts are exactly `choices` (a JSON string is a valid EBNF literal; its
    characters past ASCII kept as they are, not as escaped UTF-16 surrogate pairs)."""
    return "root ::= " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)


def _reason(error: RuntimeError) -> str:
    """xgrammar's message without its time stamp, source file and check expression."""
    message = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(error).strip())
    return message.removeprefix("Check failed: (error.empty()) is false: ")


_BITS = torch.arange(32, dtype=torch.int32)  # a bitmask word's bits, lowest first


class Constraint:
    """One row's place in its grammar: which tokens may come next, and the tokens it has taken."""

    def __init__(self, grammar: Grammar):
        self.matcher = xgr.GrammarMatcher(grammar.compiled)
        vocab_size = grammar.compiled.tokenizer_info.vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [1, ceil(V / 32)] int32, bit t: token t allowed

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] with every token the grammar does not allow next at -inf (a copy)."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        allowed = ((self.bitmask[0, :, None] >> _BITS) & 1).bool().view(-1)  # [32 * ceil(V / 32)]
        return logits.masked_fill(~allowed[: logits.shape[-1]].to(logits.device), float("-inf"))

    def accept(self, token: int) -> bool:
        """Follow `token`; False if the grammar does not allow it (the matcher is then unchanged):
        sampled from `masked` logits, only where the grammar allows no token at all."""
        return self.matcher.accept_token(token)
