"""The read-side checks on their own: content paths, safetensors headers, the manifest schema,
and the escaping of archive text."""

from __future__ import annotations

import html
import json
import struct
from pathlib import Path

import jsonschema
import pytest
import torch
from safetensors.torch import save_file

from exporter.archive.header import read_safetensors_header, validate_header
from exporter.archive.text import markdown_code, markdown_text, plot_text, terminal_text
from exporter.archive.trust import check_relative, resolve_inside
from exporter.archive.validate import validate_manifest
from exporter.errors import ArchiveError

SCHEMAS = Path(__file__).parent.parent / "schemas"
HOSTILE_TEXTS = [
    "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "[x](javascript:alert(1))",
    "*bold* _it_ `code` ~~s~~ $x^2$", "a | b | c", "\x1b[2J\x1b]0;t\x07", "line\n# heading",
    "&amp; &lt;", "\\*not\\*", "\u202eevil\u202c", "![i](http://x/y.png)", "<b>",
]


@pytest.mark.parametrize("path", ["manifest.json", "steps/step8/model.safetensors",
                                  "index/tensors/step8.parquet", "steps/step8/optimizer/m.st",
                                  ".gitattributes", "a..b/c.d"])
def test_layout_paths_are_accepted(path: str) -> None:
    assert check_relative(path, "row 0") == path


@pytest.mark.parametrize(("path", "reason"), [
    ("../secret", "leaves the archive"), ("steps/../../secret", "leaves the archive"),
    ("/etc/passwd", "is absolute"), ("C:/x", "is absolute"), ("steps\\..\\x", "backslash"),
    ("steps//x", "empty or '.'"), ("./x", "empty or '.'"), ("steps/", "empty or '.'"),
    (".git/config", "into .git"), ("steps/.GIT/x", "into .GIT"), ("x\x00y", "control"),
    ("x\ny", "control"), ("x\u202ey", "control"), ("", "not a relative path"),
    (None, "not a relative path"), (3, "not a relative path"), ("x" * 5000, "characters"),
])
def test_paths_that_leave_the_archive_are_refused(path: object, reason: str) -> None:
    with pytest.raises(ArchiveError, match=f"^index row 7: .*{reason}"):
        check_relative(path, "index row 7")


def test_symlinks_are_followed_and_must_stay_inside(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "steps").mkdir(parents=True)
    outside.mkdir()
    (root / "steps" / "inner").symlink_to(root / "manifest.json")
    (root / "steps" / "out").symlink_to(outside)
    (root / ".git").mkdir()
    (root / "steps" / "git").symlink_to(root / ".git")

    assert resolve_inside(root, "steps/inner", "t") == (root / "manifest.json").resolve()
    with pytest.raises(ArchiveError, match="leads outside"):
        resolve_inside(root, "steps/out/file", "t")
    with pytest.raises(ArchiveError, match="leads into .git"):
        resolve_inside(root, "steps/git/config", "t")


def _file(tmp_path: Path, header: bytes, data: bytes) -> Path:
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def test_headers_written_by_safetensors_are_valid(tmp_path: Path) -> None:
    tensors = {"a": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.ones(0, 4),
               "c": torch.arange(7, dtype=torch.int64), "d": torch.tensor(True)}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})

    with open(tmp_path / "t.safetensors", "rb") as fh:
        header = read_safetensors_header(fh, "t")

    assert {n: (e.dtype, e.shape) for n, e in header.entries.items()} == {
        "a": ("BF16", (3, 5)), "b": ("F32", (0, 4)), "c": ("I64", (7,)), "d": ("BOOL", ())}
    assert header.metadata == {"format": "pt"}
    assert header.data_start + header.data_size == (tmp_path / "t.safetensors").stat().st_size


@pytest.mark.parametrize(("header", "size", "error"), [
    ({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}, 6, "at the end belong to no"),
    ({"w": {"dtype": "F16", "shape": [2], "data_offsets": [2, 6]}}, 6, "before tensor 'w'"),
    ({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
      "v": {"dtype": "F16", "shape": [2], "data_offsets": [2, 6]}}, 6, "overlap"),
    ({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4], "extra": 1}}, 4, "is not"),
    ({"w": {"dtype": "F16", "shape": [2], "data_offsets": [-4, 0]}}, 4, "run outside"),
    ({"w": {"dtype": "F16", "shape": [True], "data_offsets": [0, 2]}}, 2, "non-negative"),
    ({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4.0]}}, 4, "two integers"),
    ({"w": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]}}, 4, "unknown dtype"),
    ({"w": [1, 2]}, 0, "is not"),
])
def test_headers_that_break_the_format_are_refused(header: dict, size: int, error: str) -> None:
    with pytest.raises(ArchiveError, match=f"^f.safetensors: .*{error}"):
        validate_header(json.dumps(header).encode(), size, "f.safetensors")


def test_a_header_that_does_not_begin_with_a_brace_is_refused(tmp_path: Path) -> None:
    path = _file(tmp_path, b' {"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x")
    with open(path, "rb") as fh, pytest.raises(ArchiveError, match="does not begin with"):
        read_safetensors_header(fh, "t")


def _manifest() -> dict:
    return {"format_version": 1, "tool": {"name": "neox-exporter", "version": "1.0"},
            "source": "runs/tiny", "options": {"include": ["model"], "dtype": None},
            "steps": {"8": {"tensors": 28, "bytes_out": 10, "files": 3}}, "failed": {}}


MANIFESTS = {
    "benign": lambda m: m,
    "no_tool": lambda m: m.pop("tool"),
    "bool_version": lambda m: m.update(format_version=True),
    "step_key": lambda m: m["steps"].update(eight={"tensors": 1, "bytes_out": 1, "files": 1}),
    "negative": lambda m: m["steps"]["8"].update(tensors=-1),
    "float_count": lambda m: m["steps"]["8"].update(files=1.5),
    "include": lambda m: m["options"].update(include=["model", "weights"]),
    "compress": lambda m: m["options"].update(compress="gzip"),
    "failed_error": lambda m: m["failed"].update({"3": {"error": 5}}),
    "tool_name": lambda m: m["tool"].update(name="other"),
    "steps_list": lambda m: m.update(steps=[]),
}


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_the_manifest_check_agrees_with_jsonschema_on_the_committed_schema(name: str) -> None:
    manifest = _manifest()
    MANIFESTS[name](manifest)
    schema = json.loads((SCHEMAS / "manifest.schema.json").read_text())
    valid = jsonschema.Draft202012Validator(schema).is_valid(manifest)

    try:
        validate_manifest(manifest, "manifest.json")
        ours = True
    except ArchiveError:
        ours = False

    assert ours == valid and valid == (name == "benign")


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
def test_markdown_text_renders_as_exactly_the_text(text: str) -> None:
    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark", {"html": True}).enable("table").render(
        f"| a |\n|---|\n| {markdown_text(text)} |")

    cell = rendered.split("<td>")[1].split("</td>")[0]
    assert html.unescape(cell) == terminal_text(text)


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
def test_markdown_code_renders_as_exactly_the_text(text: str) -> None:
    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark", {"html": True}).render(markdown_code(text))

    code = rendered.split("<code>")[1].split("</code>")[0]
    assert html.unescape(code) == terminal_text(text)


@pytest.mark.parametrize("text", HOSTILE_TEXTS)
def test_terminal_and_plot_text_hold_no_control_characters_or_mathtext(text: str) -> None:
    from matplotlib.cbook import is_math_text

    for shown in (terminal_text(text), plot_text(text)):
        assert not [c for c in shown if ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 or c == "\u202e"]
    assert not is_math_text(plot_text(text)) and len(plot_text("x" * 500)) <= 80


def test_docstring_examples_run() -> None:
    import doctest

    import exporter.archive.header as header
    import exporter.archive.text as text
    import exporter.archive.trust as trust
    import exporter.archive.validate as validate

    runner = doctest.DocTestRunner()
    for module in (header, text, trust, validate):
        for test in doctest.DocTestFinder().find(module):
            runner.run(test)

    assert runner.tries >= 8 and runner.failures == 0
