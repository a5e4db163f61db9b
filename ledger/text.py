"""Which characters the ledger accepts in text it stores or passes to the model, and how it shows text safely.

    text_problem("A\u202eB")   -> "contains the bidi control U+202E"   (None for acceptable text)
    for_terminal("A\u202eB")   -> "A\\u202eB"                           (what `list` and `show` print)

Refused anywhere: control characters (C0/C1, so no newline or escape sequences), surrogates, line/paragraph
separators, the bidi embedding/override/isolate controls U+202A–U+202E and U+2066–U+2069 (they reorder what a
reviewer sees: "Trojan Source"), and text made only of invisible characters (zero-width spaces, joiners, word
joiner, BOM, Hangul fillers, …). Zero-width joiners and the marks U+200E/U+200F inside visible text are fine:
emoji sequences and right-to-left scripts need them; the terminal view escapes the marks.
"""
from __future__ import annotations

import unicodedata

BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
BIDI_MARKS = frozenset("\u200e\u200f\u061c")
# Characters that render as nothing but are not in category Cf (which is invisible by definition).
INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f\u17b4\u17b5\u180b\u180c\u180d\u180e")
SEPARATORS = frozenset("\u2028\u2029")


def text_problem(text: str) -> str | None:
    """What makes `text` unacceptable, or None. The message names the first offending character."""
    for ch in text:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cs") or ch in SEPARATORS:
            return f"contains the control character U+{ord(ch):04X}"
        if ch in BIDI_CONTROLS:
            return f"contains the bidi control U+{ord(ch):04X} ({unicodedata.name(ch, 'bidi control')})"
    if text and all(_is_invisible(ch) for ch in text):
        return "has only invisible characters (" + " ".join(f"U+{ord(c):04X}" for c in dict.fromkeys(text)) + ")"
    return None


def _is_invisible(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch) == "Cf" or ch in INVISIBLE


def for_terminal(text: str) -> str:
    """`text` with control, bidi and other format characters written as \\uXXXX escapes (ZWJ/ZWNJ kept)."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        unsafe = cat in ("Cc", "Cs", "Co", "Cn", "Zl", "Zp") or ch in BIDI_CONTROLS or ch in BIDI_MARKS or (
            cat == "Cf" and ch not in "\u200c\u200d")
        out.append(f"\\u{ord(ch):04x}" if unsafe and ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}" if unsafe else ch)
    return "".join(out)


def json_for_terminal(text: str) -> str:
    """A JSON document with every control, format (bidi, zero-width) and unassigned character written as a
    \\uXXXX escape: the same JSON value, nothing a terminal would act on. Such characters only occur inside JSON
    strings, where the escape is equivalent."""
    if text.isprintable() or all(ch.isprintable() or ch in "\n\t" for ch in text):
        return text
    out = []
    for ch in text:
        if ch in "\n\t" or ch.isprintable() or ch == " ":
            out.append(ch)
        elif ord(ch) > 0xFFFF:  # JSON escapes astral characters as a surrogate pair
            v = ord(ch) - 0x10000
            out.append(f"\\u{0xD800 + (v >> 10):04x}\\u{0xDC00 + (v & 0x3FF):04x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)
