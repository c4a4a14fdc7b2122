"""The keyword rule that gives CodeAlpaca examples a programming language (Fed-CodeAlpaca clients)."""

from __future__ import annotations

import pytest

from fedtune.data.code_language import (
    LANGUAGES,
    OTHER,
    code_language,
    named_languages,
    syntax_scores,
)
from fedtune.data.records import to_examples

CASES = [
    # named in the instruction
    ("Write a function in Python to add two numbers.", "", "", "Python"),
    ("Write a C++ program that prints hello.", "", "", "C++"),
    ("Write a program in C to print hello.", "", "", "C"),
    ("Write a C# method that returns the sum.", "", "", "C#"),
    ("Write a Go function to sum a slice.", "", "", "Go"),
    ("Write a Java method to reverse a list.", "", "", "Java"),
    ("Write a PHP script that greets the user.", "", "", "PHP"),
    ("Write a Pascal program to print hi.", "", "", "Pascal"),
    ("Write a Scala function to square a number.", "", "", "Scala"),
    # named by the syntax of the output
    ("Create a function to reverse a string.", "", "def rev(s):\n    return s[::-1]\n", "Python"),
    ("Print hello.", "", '#include <iostream>\nint main() { std::cout << "hi"; }', "C++"),
    ("Print hello.", "", '#include <stdio.h>\nint main() { printf("hi"); }', "C"),
    ("Print x.", "", 'using System;\nclass P { static void Main() { Console.WriteLine(1); } }', "C#"),
    ("Sum.", "", 'package main\nimport "fmt"\nfunc main() {\n\tfmt.Println(1)\n}', "Go"),
    ("Print x.", "", 'public class A { public static void main(String[] a) { System.out.println(1); } }',
     "Java"),
    ("Echo x.", "", "<?php\n$x = 5;\necho $x;\n?>", "PHP"),
    ("Greet.", "", "program Hello;\nbegin\n  writeln('Hello');\nend.", "Pascal"),
    ("Square.", "", "object Main extends App {\n  val x = 5\n  println(x * x)\n}", "Scala"),
    # words that are not the language
    ("Go through the list and print each item.", "", "for x in items:\n    print(x)\n", "Python"),
    ("Generate Pascal's triangle with 5 rows.", "", "def pascal(n):\n    return []\n", "Python"),
    ("Use PascalCase for the class name.", "", "", OTHER),
    ("Write a JavaScript function that logs 1.", "", "function f() { console.log(1); }", OTHER),
    # several named: the output's syntax, else the last named (a translation's target)
    ("Convert this C code to Python.", "int x = 1;", "x = 1\nprint(x)\n", "Python"),
    ("Translate the Python code to Java.", "print(1)", "System.out.println(1);", "Java"),
    ("Rewrite the Java snippet in Scala.", "", "", "Scala"),
    # no language of the nine, or no code
    ("Write an SQL query to select all rows.", "", "SELECT * FROM t;", OTHER),
    ("Describe the difference between a list and a tuple.", "", "A list is mutable.", OTHER),
    ("Create an HTML page.", "", "<html><body></body></html>", OTHER),
]


@pytest.mark.parametrize(("instruction", "input", "output", "expected"), CASES)
def test_code_language_on_hand_written_examples(instruction, input, output, expected):
    assert code_language(instruction, input, output) == expected


def test_every_language_is_reachable_and_parts_are_exposed():
    assert {expected for *_, expected in CASES} == {*LANGUAGES, OTHER}
    assert named_languages("Port this C++ code to Go and then to Rust") == ["C++", "Go"]
    assert syntax_scores("def f(x):\n    return x\nprint(f(1))\n") == {"Python": 2}
    assert syntax_scores("no code here") == {}


def test_codealpaca_format_derives_the_category_unless_mapped():
    rows = [("f.json[0]", {"instruction": "Write a Java method.", "input": "", "output": "x"}),
            ("f.json[1]", {"instruction": "Say hi.", "input": "", "output": "print('hi')"})]
    examples = to_examples(rows, format="codealpaca", fields={})
    assert [ex.category for ex in examples] == ["Java", "Python"]
    assert [ex.category for ex in to_examples(rows, format="alpaca", fields={})] == [None, None]
    labelled = [(o, {**row, "lang": "Rust"}) for o, row in rows]
    mapped = to_examples(labelled, format="codealpaca", fields={"category": "lang"})
    assert [ex.category for ex in mapped] == ["Rust", "Rust"]
