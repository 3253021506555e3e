"""Consul's `?filter=` expression language (HashiCorp go-bexpr), over the JSON that an endpoint answers.

    Expression := Or;  Or := And ("or" And)*;  And := Not ("and" Not)*
    Not        := "not" Not | "(" Or ")" | Match
    Match      := Selector ("==" | "!=") Value | Selector "is" ["not"] "empty"
                | Value ["not"] "in" Selector | Selector ["not"] ("contains" | "matches") Value
    Selector   := Name ("." Name | "[" String "]")*
    Value      := "string" | `raw string` | number | true | false | bare word

As go-bexpr does, a selector is checked against the shape of what the endpoint returns before
anything is evaluated (an unknown field is a 400 even on an empty answer); the fields of a map
(`Meta`, `NodeMeta`, `TaggedAddresses`...) take any key. A selector that passes through a list
(`Checks.Status`) collects the values of every element; `==` and `matches` hold when one does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

ERROR_PREFIX = "Failed to create evaluator for expression: "
MAP_FIELDS = frozenset(
    {"Meta", "NodeMeta", "ServiceMeta", "TaggedAddresses", "ServiceTaggedAddresses", "Definition", "Header"}
)
KEYWORDS = frozenset({"and", "or", "not", "in", "is", "empty", "contains", "matches"})
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<raw>`[^`]*`)
      | (?P<op>==|!=|\(|\)|\[|\]|\.)
      | (?P<number>-?\d+(?:\.\d+)?(?![\w:/-]))
      | (?P<word>[A-Za-z0-9_][A-Za-z0-9_\-:/]*)
    )""",
    re.VERBOSE,
)

Predicate = Callable[[Any], bool]


class FilterError(ValueError):
    """An expression Consul would refuse; the text is Consul's 400 body."""


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    offset: int


def _tokens(expression: str) -> list[Token]:
    out: list[Token] = []
    pos = 0
    while pos < len(expression):
        if expression[pos:].strip() == "":
            break
        match = _TOKEN.match(expression, pos)
        if match is None or match.lastgroup is None:
            start = len(expression) - len(expression[pos:].lstrip())
            raise FilterError(f"{ERROR_PREFIX}1:{start + 1} ({start}): no match found, expected: a selector or value")
        kind = match.lastgroup
        text = match.group(kind)
        out.append(Token(kind, text, match.start(kind)))
        pos = match.end()
    return out


def _unquote(token: Token) -> str:
    if token.kind == "raw":
        return token.text[1:-1]
    if token.kind == "string":
        return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), token.text[1:-1])
    return token.text


_MISSING = object()


def select(document: Any, path: tuple[str, ...]) -> Any:
    """The value at `path`; a list on the way collects from every element (returned as a tuple)."""
    current: Any = document
    for number, part in enumerate(path):
        if isinstance(current, list):
            values = [select(item, path[number:]) for item in current]
            flat: list[Any] = []
            for value in values:
                if isinstance(value, tuple):
                    flat.extend(value)
                elif value is not _MISSING:
                    flat.append(value)
            return tuple(flat)
        if not isinstance(current, Mapping) or part not in current:
            return _MISSING
        current = current[part]
    return current


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _equal(actual: Any, wanted: str) -> bool:
    if actual is _MISSING or actual is None:
        return False
    if isinstance(actual, tuple):
        return any(_equal(item, wanted) for item in actual)
    if isinstance(actual, (int, float)) and not isinstance(actual, bool):
        try:
            return float(actual) == float(wanted)
        except ValueError:
            return False
    return _text(actual) == wanted


def _contains(actual: Any, wanted: str) -> bool:
    if actual is _MISSING or actual is None:
        return False
    if isinstance(actual, (list, tuple)):
        return any(_text(item) == wanted for item in actual)
    if isinstance(actual, Mapping):
        return wanted in actual
    return wanted in _text(actual)


def _empty(actual: Any) -> bool:
    return actual is _MISSING or actual is None or (not isinstance(actual, (bool, int, float)) and len(actual) == 0)


def _matches(actual: Any, pattern: re.Pattern[str]) -> bool:
    if isinstance(actual, tuple):
        return any(_matches(item, pattern) for item in actual)
    if actual is _MISSING or actual is None or isinstance(actual, (Mapping, list)):
        return False
    return pattern.search(_text(actual)) is not None


def check_selector(sample: Any, path: tuple[str, ...], shown: str) -> None:
    """Refuse a selector that names no field of the endpoint's shape, as go-bexpr does up front."""
    current: Any = sample
    for number, part in enumerate(path):
        while isinstance(current, list):
            current = current[0] if current else {}
        if isinstance(current, Mapping) and part in current:
            if path[number - 1 : number] and path[number - 1] in MAP_FIELDS:
                return  # a key of a map field: anything goes from here
            current = current[part]
            continue
        if number > 0 and path[number - 1] in MAP_FIELDS:
            return
        raise FilterError(f'{ERROR_PREFIX}Selector "{shown}" is not valid')


class _Parser:
    def __init__(self, expression: str, sample: Any) -> None:
        self.expression = expression
        self.tokens = _tokens(expression)
        self.pos = 0
        self.sample = sample
        self.selectors: list[tuple[tuple[str, ...], str]] = []

    def _peek(self, ahead: int = 0) -> Token | None:
        at = self.pos + ahead
        return self.tokens[at] if at < len(self.tokens) else None

    def _is(self, text: str, ahead: int = 0) -> bool:
        token = self._peek(ahead)
        return token is not None and token.text == text and token.kind in ("word", "op")

    def _fail(self, expected: str) -> FilterError:
        token = self._peek()
        offset = token.offset if token else len(self.expression)
        return FilterError(f"{ERROR_PREFIX}1:{offset + 1} ({offset}): no match found, expected: {expected}")

    def _take(self, text: str) -> None:
        if not self._is(text):
            raise self._fail(f'"{text}"')
        self.pos += 1

    def parse(self) -> Predicate:
        if not self.tokens:
            raise self._fail("an expression")
        predicate = self._or()
        if self._peek() is not None:
            raise self._fail('"and", "or" or the end of the expression')
        # As go-bexpr: the whole expression parses first, then its selectors are checked.
        for path, shown in self.selectors:
            check_selector(self.sample, path, shown)
        return predicate

    def _or(self) -> Predicate:
        parts = [self._and()]
        while self._is("or"):
            self.pos += 1
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else (lambda doc: any(p(doc) for p in parts))

    def _and(self) -> Predicate:
        parts = [self._not()]
        while self._is("and"):
            self.pos += 1
            parts.append(self._not())
        return parts[0] if len(parts) == 1 else (lambda doc: all(p(doc) for p in parts))

    def _not(self) -> Predicate:
        if self._is("not") and not (self._is("in", 1) or self._is("contains", 1) or self._is("matches", 1)):
            self.pos += 1
            inner = self._not()
            return lambda doc: not inner(doc)
        if self._is("("):
            self.pos += 1
            inner = self._or()
            self._take(")")
            return inner
        return self._match()

    def _value(self) -> str:
        token = self._peek()
        if token is None or token.kind == "op" or (token.kind == "word" and token.text in KEYWORDS):
            raise self._fail("a value")
        self.pos += 1
        return _unquote(token)

    def _selector(self) -> tuple[tuple[str, ...], str]:
        token = self._peek()
        if token is None or token.kind != "word" or token.text in KEYWORDS:
            raise self._fail("a selector")
        start = token.offset
        parts = [token.text]
        self.pos += 1
        while True:
            if self._is(".") and (nxt := self._peek(1)) is not None and nxt.kind in ("word", "number"):
                parts.append(nxt.text)
                self.pos += 2
            elif self._is("[") and (key := self._peek(1)) is not None and key.kind in ("string", "raw"):
                parts.append(_unquote(key))
                self.pos += 2
                self._take("]")
            else:
                break
        end_token = self.tokens[self.pos - 1]
        shown = self.expression[start : end_token.offset + len(end_token.text)]
        path = tuple(parts)
        self.selectors.append((path, shown))
        return path, shown

    def _match(self) -> Predicate:
        first = self._peek()
        if first is None:
            raise self._fail("a selector or value")
        value_first = first.kind in ("string", "raw", "number") or (
            first.kind == "word" and (self._is("in", 1) or (self._is("not", 1) and self._is("in", 2)))
        )
        if value_first:
            wanted = self._value()
            negate = self._is("not")
            if negate:
                self.pos += 1
            self._take("in")
            path, _ = self._selector()
            return lambda doc: _contains(select(doc, path), wanted) != negate
        path, _ = self._selector()
        if self._is("==") or self._is("!="):
            negate = self._peek() is not None and self._is("!=")
            self.pos += 1
            wanted = self._value()
            return lambda doc: _equal(select(doc, path), wanted) != negate
        if self._is("is"):
            self.pos += 1
            negate = self._is("not")
            if negate:
                self.pos += 1
            self._take("empty")
            return lambda doc: _empty(select(doc, path)) != negate
        negate = self._is("not")
        if negate:
            self.pos += 1
        if self._is("contains"):
            self.pos += 1
            wanted = self._value()
            return lambda doc: _contains(select(doc, path), wanted) != negate
        if self._is("matches"):
            self.pos += 1
            raw = self._value()
            try:
                pattern = re.compile(raw)
            except re.error as exc:
                raise FilterError(f"{ERROR_PREFIX}error parsing regexp: {exc}") from None
            return lambda doc: _matches(select(doc, path), pattern) != negate
        raise self._fail('"==", "!=", "is", "contains", "matches", "in" or "not"')


def compile_filter(expression: str, sample: Any) -> Predicate:
    """A predicate over one element of an endpoint's answer; `sample` is one element of its shape."""
    return _Parser(expression, sample).parse()
