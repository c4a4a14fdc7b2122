"""The programming language of a code instruction example, by keywords (Fed-CodeAlpaca's clients).

CodeAlpaca has no language field; FederatedScope-LLM splits it by the language of each sample
into C, C#, C++, Go, Java, PHP, Pascal, Python and Scala, everything else being one more class.
`code_language` is a small, documented rule, not a model:

1. A language named in the instruction or input ("in Python", "a Java program", "C++",
   "Golang") decides. Bare words that are usually something else need a cue: "Go" and "C"
   must read as a language ("in C", "a Go function", "ANSI C"); "Pascal" followed by "'s" or
   "triangle" is the triangle, and "Pascal"/"Scala" inside longer words do not count.
   When several are named ("convert this C code to Python"), the one whose syntax shows most
   in the output wins; on a tie, the one named last (the target of a translation).
2. Otherwise the output's syntax decides: the language with the most markers
   (`#include <iostream>` and `std::` for C++, `System.out.println` for Java, `<?php` for PHP,
   `package main` and `fmt.` for Go, ...), ties going to the earlier language in LANGUAGES.
3. Otherwise OTHER: another language (JavaScript, SQL, HTML, ...) or no code at all.
"""

from __future__ import annotations

import re

LANGUAGES = ("C", "C#", "C++", "Go", "Java", "PHP", "Pascal", "Python", "Scala")
OTHER = "other"

_M = re.MULTILINE
# A language named in prose. Case-sensitive: "go", "c", "java" in lower case are ordinary words.
_NAMED: dict[str, re.Pattern[str]] = {
    "C++": re.compile(r"(?<![\w+])(?:C\+\+|cpp|CPP)(?![\w+])"),
    "C#": re.compile(r"(?<![\w#])(?:C#|C Sharp|CSharp|\.NET)(?![\w#])"),
    "C": re.compile(r"\b(?:in|using|into|ANSI|standard)\s+C\b(?![+#])|(?<![-\w])C\s+(?:program"
                    r"|code|function|language|snippet|struct|library|header|compiler)\b"),
    "Go": re.compile(r"\bGolang\b|\b(?:in|using|into|to|with)\s+Go\b|\bGo\s+(?:program|code|function"
                     r"|language|snippet|struct|routine|module|package|script)\b"),
    "Java": re.compile(r"\bJava\b(?!\s*Script)"),
    "PHP": re.compile(r"\bPHP\b|\bphp\b"),
    "Pascal": re.compile(r"\bPascal\b(?!\s*(?:['’]s\b|triangle|[Cc]ase\b))"),
    "Python": re.compile(r"\b[Pp]ython\d?\b"),
    "Scala": re.compile(r"\bScala\b"),
}
# Syntax markers in code; each distinct marker found counts one.
_MARKERS: dict[str, tuple[re.Pattern[str], ...]] = {
    "C": (re.compile(r"#include\s*<(?:stdio|stdlib|string|math)\.h>"), re.compile(r"\bprintf\s*\("),
          re.compile(r"\bmalloc\s*\("), re.compile(r"\bscanf\s*\(")),
    "C#": (re.compile(r"^\s*using System", _M), re.compile(r"\bConsole\.Write(?:Line)?\s*\("),
           re.compile(r"\bstatic void Main\s*\("), re.compile(r"\bnamespace\s+\w+"),
           re.compile(r"\b(?:public|private)\s+\w+\s+\w+\s*\{\s*get;")),
    "C++": (re.compile(r"#include\s*<(?:iostream|vector|string|map|algorithm|bits/stdc\+\+\.h)>"),
            re.compile(r"\bstd::"), re.compile(r"\bcout\s*<<"), re.compile(r"\bcin\s*>>"),
            re.compile(r"using namespace std")),
    "Go": (re.compile(r"^\s*package \w+", _M), re.compile(r"\bfmt\.\w+\("),
           re.compile(r"^\s*func\s+(?:\(\w+\s+\*?\w+\)\s*)?\w+\(", _M), re.compile(r"\bfunc main\(\)")),
    "Java": (re.compile(r"\bSystem\.out\.print"), re.compile(r"public static void main\s*\(\s*String"),
             re.compile(r"^\s*import java\.", _M), re.compile(r"\bpublic class\s+\w+")),
    "PHP": (re.compile(r"<\?php"), re.compile(r"\$\w+\s*=[^=]"), re.compile(r"\becho\s+[\"'$]"),
            re.compile(r"->\w+\(")),
    "Pascal": (re.compile(r"^\s*program\s+\w+\s*;", _M), re.compile(r"\bwriteln\s*\(", re.I),
               re.compile(r"^\s*begin\b", _M), re.compile(r"\bend\.\s*$", _M),
               re.compile(r"^\s*var\s+\w+\s*:", _M)),
    "Python": (re.compile(r"^\s*def \w+\(.*\)\s*(?:->[^:]+)?:\s*$", _M),
               re.compile(r"^\s*(?:import \w+|from [\w.]+ import )", _M), re.compile(r"\bprint\("),
               re.compile(r"^\s*(?:elif|for \w+ in .+|while .+|if .+|else)\s*:\s*$", _M),
               re.compile(r"\bself\.\w+")),
    "Scala": (re.compile(r"\bobject \w+(?: extends App)?\s*\{"),
              re.compile(r"^\s*def \w+(?:\[.*\])?\(.*\)\s*:\s*\w+.*=", _M),
              re.compile(r"^\s*val \w+(?:\s*:\s*\w+)?\s*=", _M), re.compile(r"\bprintln\(")),
}


def named_languages(text: str) -> list[str]:
    """The languages named in `text`, in the order they first appear."""
    found = [(match.start(), lang) for lang, pattern in _NAMED.items()
             for match in [pattern.search(text)] if match]
    return [lang for _, lang in sorted(found)]


def syntax_scores(code: str) -> dict[str, int]:
    """Language -> how many of its syntax markers occur in `code` (only those above zero)."""
    scores = {lang: sum(1 for marker in markers if marker.search(code))
              for lang, markers in _MARKERS.items()}
    return {lang: score for lang, score in scores.items() if score}


def code_language(instruction: str, input: str = "", output: str = "") -> str:
    """One of LANGUAGES, or OTHER, for an instruction example (the rule in the module docstring)."""
    named = named_languages(f"{instruction}\n{input}")
    scores = syntax_scores(output)
    if len(named) == 1:
        return named[0]
    if named:
        best = max(scores.get(lang, 0) for lang in named)
        return [lang for lang in named if scores.get(lang, 0) == best][-1]
    if scores:
        top = max(scores.values())
        return next(lang for lang in LANGUAGES if scores.get(lang) == top)
    return OTHER
