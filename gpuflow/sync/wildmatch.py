"""Git's ignore patterns, matched in time linear in the pattern times the path.

A ``.gitignore`` line compiles to an :class:`IgnorePattern` with git's rules
(``gitignore(5)``, ``dir.c``, ``wildmatch.c``):

* blank lines and ``#`` comments are skipped; unescaped trailing spaces are
  dropped; ``!`` negates; ``\\`` escapes the next character (``\\#``, ``\\!``,
  ``\\ ``, ``\\*``);
* a trailing ``/`` matches directories only; a pattern with no other ``/`` is
  matched against the last component of the path (at any depth), any other is
  matched against the whole path relative to the ignore file's directory (a
  leading ``/`` only anchors);
* ``*`` matches any run and ``?`` one byte, never ``/``; ``[...]`` is a class
  (``!``/``^`` negates, ranges, ``[:alpha:]``-style names, ``]`` first is
  literal; a malformed class never matches); a component that is only ``**``
  matches any number of directories (``**/x``, ``a/**/b``; a trailing ``/**``
  needs at least one component); other runs of ``*`` are a single ``*``.

Matching works on bytes (UTF-8, as git does), per component.  Between two
``*`` a component's pattern is a run of one-byte tokens found at its leftmost
place (greedy leftmost is exact for ``*``), so no choice is ever revisited:
there is no backtracking to blow up, whatever the pattern (``*a*a*a*a*b`` on a
long name costs what a scan costs).  The same holds one level up, for ``**``
between components.  ``steps`` counts the work (bytes compared), so tests can
bound it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_CLASS_NAMES = {
    b"alnum": lambda c: chr(c).isascii() and chr(c).isalnum(),
    b"alpha": lambda c: chr(c).isascii() and chr(c).isalpha(),
    b"blank": lambda c: c in (0x20, 0x09),
    b"cntrl": lambda c: c < 0x20 or c == 0x7F,
    b"digit": lambda c: 0x30 <= c <= 0x39,
    b"graph": lambda c: 0x21 <= c <= 0x7E,
    b"lower": lambda c: 0x61 <= c <= 0x7A,
    b"print": lambda c: 0x20 <= c <= 0x7E,
    b"punct": lambda c: 0x21 <= c <= 0x7E and not chr(c).isalnum(),
    b"space": lambda c: c in (0x20, 0x09, 0x0A, 0x0B, 0x0C, 0x0D),
    b"upper": lambda c: 0x41 <= c <= 0x5A,
    b"xdigit": lambda c: chr(c) in "0123456789abcdefABCDEF",
}


class _Malformed(Exception):
    """A pattern git's wildmatch aborts on (unterminated class, unknown class name,
    trailing backslash): git lets it match nothing; gpuflow reports it (its text
    says why)."""


_UNCLOSED_CLASS = "a '[' class is never closed (write \\[ for a literal '[')"


class Steps:
    """Counts the bytes a match compared (a bound for tests, not a timer)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


_NO_STEPS = Steps()


@dataclass(frozen=True)
class _Chunk:
    """A run of one-byte tokens between two ``*``: literal bytes, or a compiled
    quantifier-free regex (``?`` / classes), which can only be tried at each start."""

    length: int
    literal: bytes | None
    regex: re.Pattern[bytes] | None

    def match_at(self, text: bytes, position: int, steps: Steps) -> bool:
        steps.count += self.length
        if self.literal is not None:
            return text.startswith(self.literal, position)
        return self.regex.match(text, position) is not None  # type: ignore[union-attr]

    def find(self, text: bytes, start: int, stop: int, steps: Steps) -> int:
        """The leftmost position >= start where the chunk fits before ``stop``; -1 if none."""
        if self.literal is not None:
            found = text.find(self.literal, start, stop)
            steps.count += ((found if found >= 0 else stop) - start + 1) * max(self.length, 1)
            return found
        found_match = self.regex.search(text, start, stop)  # type: ignore[union-attr]
        found = found_match.start() if found_match else -1
        steps.count += ((found if found >= 0 else stop) - start + 1) * max(self.length, 1)
        return found


@dataclass(frozen=True)
class _Segment:
    """One component's pattern: chunks separated by ``*`` (``stars`` says whether there was any)."""

    chunks: tuple[_Chunk, ...]
    stars: bool

    def matches(self, text: bytes, steps: Steps) -> bool:
        chunks = self.chunks
        if not self.stars:
            only = chunks[0]
            return len(text) == only.length and only.match_at(text, 0, steps)
        first, last = chunks[0], chunks[-1]
        if first.length + last.length > len(text):
            return False
        if not first.match_at(text, 0, steps):
            return False
        stop = len(text) - last.length
        if not last.match_at(text, stop, steps):
            return False
        position = first.length
        for chunk in chunks[1:-1]:
            found = chunk.find(text, position, stop, steps)
            if found < 0:
                return False
            position = found + chunk.length
        return True


_GLOBSTAR = None  # a component pattern that is only "**"
_ANY_COMPONENT = _Segment((_Chunk(0, b"", None), _Chunk(0, b"", None)), stars=True)  # "*"


def _parse_class(pattern: bytes, index: int) -> tuple[frozenset[int], int]:
    """The bytes a class matches, and the index after its ``]`` (``index`` is at ``[``)."""
    index += 1
    negated = index < len(pattern) and pattern[index] in b"!^"
    if negated:
        index += 1
    members: set[int] = set()
    previous: int | None = None
    first = True
    while True:
        if index >= len(pattern):
            raise _Malformed(_UNCLOSED_CLASS)
        char = pattern[index]
        if char == ord("]") and not first:
            break
        first = False
        if char == ord("\\"):
            index += 1
            if index >= len(pattern):
                raise _Malformed(_UNCLOSED_CLASS)
            char = pattern[index]
            members.add(char)
            previous = char
        elif char == ord("-") and previous is not None and index + 1 < len(pattern) and pattern[index + 1] != ord("]"):
            index += 1
            end = pattern[index]
            if end == ord("\\"):
                index += 1
                if index >= len(pattern):
                    raise _Malformed(_UNCLOSED_CLASS)
                end = pattern[index]
            members.update(range(previous, end + 1))
            previous = None
        elif char == ord("[") and index + 1 < len(pattern) and pattern[index + 1] == ord(":"):
            close = index + 2
            while close < len(pattern) and pattern[close] != ord("]"):
                close += 1
            if close >= len(pattern):
                raise _Malformed(_UNCLOSED_CLASS)
            if close - (index + 2) < 1 or pattern[close - 1] != ord(":"):
                members.add(char)  # no ":]": a plain '[' in the set
                previous = char
            else:
                test = _CLASS_NAMES.get(pattern[index + 2 : close - 1])
                if test is None:
                    name = pattern[index + 2 : close - 1].decode(errors="replace")
                    raise _Malformed(f"unknown character class [:{name}:]")
                members.update(c for c in range(256) if test(c))
                previous = None
                index = close
        else:
            members.add(char)
            previous = char
        index += 1
    members.discard(ord("/"))
    matched = frozenset(range(256)) - members - {ord("/")} if negated else frozenset(members)
    return matched, index + 1


def _segment(tokens: list[bytes | frozenset[int] | None]) -> _Segment:
    """Build a component pattern from tokens: bytes (a literal byte), a set of
    bytes (``?`` or a class) or None (``*``)."""
    chunks: list[_Chunk] = []
    current: list[bytes | frozenset[int]] = []

    def close() -> None:
        if all(isinstance(token, bytes) for token in current):
            chunks.append(_Chunk(len(current), b"".join(current), None))  # type: ignore[arg-type]
            return
        parts = []
        for token in current:
            if isinstance(token, bytes):
                parts.append(re.escape(token))
            elif token:
                parts.append(b"[" + b"".join(re.escape(bytes([c])) for c in sorted(token)) + b"]")
            else:
                parts.append(b"(?!)")  # an empty class: matches nothing
        chunks.append(_Chunk(len(current), None, re.compile(b"".join(parts), re.DOTALL)))

    stars = False
    for token in tokens:
        if token is None:
            stars = True
            close()
            current = []
        else:
            current.append(token)
    close()
    return _Segment(tuple(chunks), stars)


def _compile_path(pattern: bytes) -> tuple[tuple[_Segment | None, ...], bool]:
    """Split a wildmatch pattern into component patterns (None is ``**``);
    also whether it holds a '/' (then it matches the whole path)."""
    components: list[list[bytes | frozenset[int] | None]] = [[]]
    star_runs: list[int] = [0]  # per component: length of its star run if it is only unescaped stars, else -1
    index = 0
    while index < len(pattern):
        char = pattern[index]
        escaped = char == ord("\\")
        if escaped:
            index += 1
            if index >= len(pattern):
                raise _Malformed("it ends with a lone '\\' (write \\\\ for a backslash)")
            char = pattern[index]
        if char == ord("/"):
            components.append([])
            star_runs.append(0)
            index += 1
            continue
        if char == ord("*") and not escaped:
            run = index
            while index < len(pattern) and pattern[index] == ord("*"):
                index += 1
            components[-1].append(None)
            star_runs[-1] = index - run if star_runs[-1] == 0 and len(components[-1]) == 1 else -1
            continue
        star_runs[-1] = -1
        if char == ord("?") and not escaped:
            components[-1].append(frozenset(range(256)) - {ord("/")})
            index += 1
        elif char == ord("[") and not escaped:
            members, index = _parse_class(pattern, index)
            components[-1].append(members)
        else:
            components[-1].append(bytes([char]))
            index += 1
    has_slash = len(components) > 1
    segments: list[_Segment | None] = [
        _GLOBSTAR if has_slash and run >= 2 else _segment(tokens) for tokens, run in zip(components, star_runs)
    ]
    if pattern.startswith(b"/"):
        segments = segments[1:]  # a leading '/' only anchors
    if len(segments) > 1 and segments[-1] is _GLOBSTAR:
        segments[-1:] = [_ANY_COMPONENT, _GLOBSTAR]  # a trailing "/**" needs something below
    return tuple(segments), has_slash


def _match_components(segments: tuple[_Segment | None, ...], components: list[bytes], steps: Steps) -> bool:
    """``**`` segments match any run of components, others exactly one: the
    same leftmost-greedy placement as within a component."""
    groups: list[list[_Segment]] = [[]]
    for segment in segments:
        if segment is _GLOBSTAR:
            groups.append([])
        else:
            groups[-1].append(segment)

    def fits(group: list[_Segment], start: int) -> bool:
        return all(segment.matches(components[start + offset], steps) for offset, segment in enumerate(group))

    if len(groups) == 1:
        return len(components) == len(groups[0]) and fits(groups[0], 0)
    first, last = groups[0], groups[-1]
    if len(first) + len(last) > len(components):
        return False
    stop = len(components) - len(last)
    if not fits(first, 0) or not fits(last, stop):
        return False
    position = len(first)
    for group in groups[1:-1]:
        while position + len(group) <= stop and not fits(group, position):
            steps.count += 1
            position += 1
        if position + len(group) > stop:
            return False
        position += len(group)
    return True


@dataclass(frozen=True)
class IgnorePattern:
    """One line of an ignore file, compiled."""

    text: str  # the line as written
    negated: bool
    directory_only: bool
    whole_path: bool  # matched against the path relative to the ignore file's directory, else the last component
    segments: tuple[_Segment | None, ...] | None  # None: malformed, never matches
    error: str | None = None  # why it is malformed

    def matches(self, components: list[bytes], is_directory: bool, steps: Steps = _NO_STEPS) -> bool:
        """Whether the path (its components, as bytes) matches this pattern."""
        if self.segments is None or (self.directory_only and not is_directory) or not components:
            return False
        if self.whole_path:
            return _match_components(self.segments, components, steps)
        return _match_components(self.segments, components[-1:], steps)


def _trim_trailing_spaces(line: bytes) -> bytes:
    """Git's trim_trailing_spaces: drop trailing spaces unless backslash-escaped."""
    last_space = None
    index = 0
    while index < len(line):
        char = line[index]
        if char == ord(" "):
            if last_space is None:
                last_space = index
        elif char == ord("\\"):
            index += 1
            if index >= len(line):
                return line
            last_space = None
        else:
            last_space = None
        index += 1
    return line if last_space is None else line[:last_space]


def compile_ignore_line(line: str) -> IgnorePattern | None:
    """The pattern of one ignore-file line; None for a blank line or a comment."""
    raw = _trim_trailing_spaces(os.fsencode(line.rstrip("\r")) if line else b"")
    if not raw or raw.startswith(b"#"):
        return None
    negated = raw.startswith(b"!")
    if negated:
        raw = raw[1:]
    directory_only = raw.endswith(b"/")
    if directory_only:
        raw = raw[:-1]
    if not raw:
        return None
    try:
        segments, has_slash = _compile_path(raw)
    except _Malformed as exc:
        return IgnorePattern(line, negated, directory_only, False, None, str(exc))
    return IgnorePattern(line, negated, directory_only, has_slash, segments)


class IgnoreSpec:
    """The patterns of one directory's ignore files, in order: the last that
    matches decides (a negated one re-includes)."""

    def __init__(self, lines: list[str], *, patterns: tuple[IgnorePattern, ...] | None = None) -> None:
        if patterns is None:
            patterns = tuple(pattern for pattern in map(compile_ignore_line, lines) if pattern is not None)
        self.patterns = patterns

    def decide(self, relative_path: str, is_directory: bool, steps: Steps = _NO_STEPS) -> bool | None:
        """True: ignored; False: re-included by a ``!`` pattern; None: no pattern matches."""
        components = [os.fsencode(part) for part in relative_path.split("/")]
        for pattern in reversed(self.patterns):
            if pattern.matches(components, is_directory, steps):
                return not pattern.negated
        return None
