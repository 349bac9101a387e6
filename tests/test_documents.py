"""Document ingestion: trees, .gitignore, binaries, PDFs, determinism, errors."""
from __future__ import annotations

import os
import sys

import pytest

from kimi_mlx import documents
from kimi_mlx.documents import DocFile, DocumentError, DocumentSet, load_documents


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


def _pdf(pages):
    """A minimal valid PDF with one line of Helvetica text per page."""
    n = len(pages)
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n))
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode())
    font = 3 + 2 * n
    for i, text in enumerate(pages):
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {4 + 2 * i} 0 R "
            f"/Resources << /Font << /F1 {font} 0 R >> >> >>".encode()
        )
        stream = f"BT /F1 18 Tf 72 700 Td ({text}) Tj ET".encode()
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "proj"
    _write(root / ".gitignore", "# build output\n*.log\n!keep.log\nsecret/\n/rootonly.txt\n")
    _write(root / ".git" / "config", "[core]\n")
    _write(root / "node_modules" / "pkg" / "index.js", "module.exports = 1;\n")
    _write(root / "__pycache__" / "m.cpython-312.pyc", b"\x00\x01\x02")
    _write(root / "pkg.egg-info" / "PKG-INFO", "Name: pkg\n")
    _write(root / "README.md", "# Project\n\nHello.\n")
    _write(root / "notes.txt", "plain notes")  # no trailing newline
    _write(root / "crlf.txt", b"one\r\ntwo\r\n")
    _write(root / "src" / "main.py", "print('main')\n")
    _write(root / "src" / ".gitignore", "generated_*.py\n")
    _write(root / "src" / "generated_a.py", "x = 1\n")
    _write(root / "src" / "sub" / "deep.py", "DEEP = True\n")
    _write(root / "src" / "sub" / "rootonly.txt", "anchored pattern does not apply here\n")
    _write(root / "rootonly.txt", "ignored by /rootonly.txt\n")
    _write(root / "debug.log", "ignored\n")
    _write(root / "keep.log", "kept by !keep.log\n")
    _write(root / "secret" / "key.txt", "hunter2\n")
    _write(root / "image.bin", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    _write(root / "latin1.txt", "caf\xe9 cr\xe8me, mostly ascii text here\n".encode("latin-1"))
    _write(root / "package-lock.json", "{}\n")
    _write(root / "empty.txt", "")
    os.symlink(".", root / "loop")  # a directory symlink back to the root
    os.symlink("missing-target", root / "dangling")
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "pipe")  # reading a FIFO would block forever
    return root


def test_tree_selection_and_order(tree):
    ds = load_documents([tree])
    assert isinstance(ds, DocumentSet)
    paths = [f.path for f in ds.files]
    assert paths == [
        "proj/.gitignore",
        "proj/README.md",
        "proj/crlf.txt",
        "proj/keep.log",
        "proj/latin1.txt",
        "proj/notes.txt",
        "proj/src/.gitignore",
        "proj/src/main.py",
        "proj/src/sub/deep.py",
        "proj/src/sub/rootonly.txt",
    ]
    kinds = {f.path: f.kind for f in ds.files}
    assert kinds["proj/README.md"] == "markdown"
    assert kinds["proj/src/main.py"] == "source"
    assert kinds["proj/notes.txt"] == "text"
    text = ds.render()
    assert text == ds.text
    for banned in ("hunter2", "module.exports", "generated", "ignored by", "Name: pkg", "[core]"):
        assert banned not in text.replace("generated_*.py", "")
    skipped = "\n".join(ds.skipped)
    assert "proj/image.bin (binary)" in skipped
    assert "proj/debug.log (.gitignore)" in skipped
    assert "proj/secret/ (.gitignore)" in skipped
    assert "proj/src/generated_a.py (.gitignore)" in skipped
    assert "proj/loop/" in skipped  # loop detected, not followed
    assert "proj/package-lock.json" in skipped
    assert "proj/empty.txt (empty)" in skipped
    if hasattr(os, "mkfifo"):
        assert "proj/pipe (not a regular file)" in skipped
    warnings = "\n".join(ds.warnings)
    assert "proj/latin1.txt: not valid UTF-8" in warnings
    assert "proj/dangling: broken symlink" in warnings
    assert "skipped 1 binary file" in warnings


def test_rendering_format(tree):
    ds = load_documents([tree])
    text = ds.text
    assert text.startswith("=== proj/.gitignore ===\n")
    assert "=== proj/notes.txt ===\nplain notes\n\n=== " in text  # newline added, blank separator
    assert "=== proj/crlf.txt ===\none\ntwo\n\n" in text  # CRLF normalised
    assert "caf\ufffd cr\ufffdme" in text  # replacement characters, not a crash
    assert "\r" not in text
    f = {d.path: d for d in ds.files}["proj/README.md"]
    assert f == DocFile("proj/README.md", "markdown", len("# Project\n\nHello.\n"), 18)


def test_deterministic_and_cwd_independent(tree, tmp_path, monkeypatch):
    a = load_documents([tree]).text
    b = load_documents([str(tree)]).text
    monkeypatch.chdir(tmp_path)
    c = load_documents(["proj"]).text
    monkeypatch.chdir(tree)
    d = load_documents(["."]).text
    assert a == b == c == d
    assert str(tmp_path) not in a  # no absolute paths in the prompt


@pytest.mark.parametrize(
    "pattern,path,is_dir,expected",
    [
        ("*.log", "a/b/x.log", False, True),
        ("/top.txt", "top.txt", False, True),
        ("/top.txt", "a/top.txt", False, None),
        ("docs/*.md", "docs/a.md", False, True),
        ("docs/*.md", "docs/sub/a.md", False, None),
        ("docs/*.md", "x/docs/a.md", False, None),  # inner slash anchors
        ("out/", "out", True, True),
        ("out/", "out", False, None),  # directory-only
        ("**/gen", "a/b/gen", True, True),
        ("a/**/z", "a/z", False, True),
        ("a/**/z", "a/b/c/z", False, True),
        ("abc/**", "abc/x/y", False, True),
        ("f?o.[ch]", "foo.c", False, True),
        ("f?o.[!ch]", "foo.c", False, None),
        ("\\#lit", "#lit", False, True),
        ("name   ", "name", False, True),  # trailing spaces ignored
    ],
)
def test_gitignore_rules(tmp_path, pattern, path, is_dir, expected):
    assert documents._IgnoreFile(tmp_path, [pattern]).decide(tmp_path / path, is_dir) is expected


def test_negation_last_rule_wins(tmp_path):
    rules = documents._IgnoreFile(tmp_path, ["*.txt", "!keep.txt", "# comment", ""])
    assert rules.decide(tmp_path / "a.txt", False) is True
    assert rules.decide(tmp_path / "keep.txt", False) is False
    assert rules.decide(tmp_path / "a.md", False) is None
    assert rules.decide(tmp_path.parent / "a.txt", False) is None  # outside its directory


def test_nested_gitignore_overrides_root(tmp_path):
    root = tmp_path / "r"
    _write(root / ".gitignore", "*.dat\n")
    _write(root / "a.dat", "root ignores me\n")
    _write(root / "sub" / ".gitignore", "!*.dat\n")
    _write(root / "sub" / "b.dat", "nested re-includes me\n")
    paths = [f.path for f in load_documents([root]).files]
    assert "r/a.dat" not in paths
    assert "r/sub/b.dat" in paths


def test_parent_gitignore_of_enclosing_repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    _write(repo / ".gitignore", "*.tmp\n")
    _write(repo / "pkg" / "a.py", "A = 1\n")
    _write(repo / "pkg" / "b.tmp", "scratch\n")
    paths = [f.path for f in load_documents([repo / "pkg"]).files]
    assert paths == ["pkg/a.py"]


def test_unreadable_file_is_a_warning(tree, monkeypatch):
    real = documents._read_bytes

    def fake(path):
        if path.name == "main.py":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(documents, "_read_bytes", fake)
    ds = load_documents([tree])
    assert "proj/src/main.py" not in [f.path for f in ds.files]
    assert any(w.startswith("proj/src/main.py: unreadable (Permission denied)") for w in ds.warnings)


def test_unreadable_file_real_permissions(tmp_path):
    if os.geteuid() == 0 or sys.platform == "win32":
        pytest.skip("root reads files regardless of permissions")
    root = tmp_path / "t"
    _write(root / "ok.txt", "fine\n")
    bad = _write(root / "locked.txt", "secret\n")
    bad.chmod(0)
    try:
        ds = load_documents([root])
    finally:
        bad.chmod(0o644)
    assert [f.path for f in ds.files] == ["t/ok.txt"]
    assert any("t/locked.txt: unreadable" in w for w in ds.warnings)


def test_unreadable_directory_is_a_warning(tree, monkeypatch):
    real = os.scandir

    def fake(path):
        if os.path.basename(os.fspath(path)) == "sub":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(documents.os, "scandir", fake)
    ds = load_documents([tree])
    assert "proj/src/sub/deep.py" not in [f.path for f in ds.files]
    assert any(w.startswith("proj/src/sub/: unreadable directory") for w in ds.warnings)


def test_pdf_extraction(tmp_path):
    pytest.importorskip("pypdf")
    pdf = _write(tmp_path / "paper.pdf", _pdf(["Hello PDF world", "Second page text"]))
    ds = load_documents([pdf])
    (f,) = ds.files
    assert f.kind == "pdf" and f.path == "paper.pdf" and f.bytes == pdf.stat().st_size
    assert ds.text.startswith("=== paper.pdf ===\n--- page 1 ---\n")
    assert "Hello PDF world" in ds.text
    assert "--- page 2 ---\nSecond page text" in ds.text
    assert load_documents([pdf]).text == ds.text


def test_pdf_in_tree_and_broken_pdf(tmp_path):
    pytest.importorskip("pypdf")
    root = tmp_path / "d"
    _write(root / "a.pdf", _pdf(["Tree PDF"]))
    _write(root / "b.pdf", b"%PDF-1.4\nthis is not really a pdf\n")
    _write(root / "c.txt", "text\n")
    ds = load_documents([root])
    assert [f.path for f in ds.files] == ["d/a.pdf", "d/c.txt"]
    assert any(w.startswith("d/b.pdf:") for w in ds.warnings)


def test_pdf_without_pypdf(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pypdf", None)  # makes "import pypdf" fail
    pdf = _write(tmp_path / "x.pdf", _pdf(["x"]))
    with pytest.raises(DocumentError, match=r"x\.pdf: reading PDF files needs the optional 'pypdf'"):
        load_documents([pdf])
    _write(tmp_path / "t" / "x.pdf", _pdf(["x"]))
    _write(tmp_path / "t" / "y.txt", "y\n")
    ds = load_documents([tmp_path / "t"])  # inside a tree: a warning, not an error
    assert [f.path for f in ds.files] == ["t/y.txt"]
    assert any("t/x.pdf" in w and "pypdf" in w for w in ds.warnings)


def test_errors_name_the_path(tmp_path):
    with pytest.raises(DocumentError, match="no documents given"):
        load_documents([])
    missing = tmp_path / "nope.txt"
    with pytest.raises(DocumentError, match="nope.txt: no such file or directory"):
        load_documents([missing])
    _write(tmp_path / "bin" / "a.bin", b"\x00\x01")
    with pytest.raises(DocumentError, match="no readable text found in .*bin"):
        load_documents([tmp_path / "bin"])
    assert issubclass(DocumentError, ValueError)


def test_explicit_files_order_names_and_dedup(tmp_path):
    a = _write(tmp_path / "x" / "notes.md", "first\n")
    b = _write(tmp_path / "y" / "notes.md", "second\n")
    c = _write(tmp_path / "y" / "other.txt", "third\n")
    calls = []
    ds = load_documents([b, a, tmp_path / "y"], on_progress=lambda *args: calls.append(args))
    # user order kept, same-named files told apart by their parent
    assert [f.path for f in ds.files] == ["y/notes.md", "x/notes.md", "y/other.txt"]
    assert ds.skipped == ["y/notes.md (already included)"]  # not included twice
    assert calls[-1][:2] == (4, 4) and len(calls) == 4
    assert c.exists()


def test_symlinked_file_keeps_its_own_name(tmp_path):
    real = _write(tmp_path / "real.txt", "content\n")
    os.symlink(real, tmp_path / "alias.txt")
    ds = load_documents([tmp_path / "alias.txt"])
    assert ds.text == "=== alias.txt ===\ncontent\n\n"


def test_symlinks_out_of_a_directory_are_not_followed(tmp_path):
    """`ln -s /etc d/x; --document d` must not read the target: links that leave the tree are
    skipped and listed; links within the tree are followed; a link named directly is read."""
    outside = tmp_path / "outside"
    _write(outside / "shadow", "root:SECRET-HASH:19000:0:99999:7:::\n")
    _write(outside / "sub" / "deep.txt", "SECRET-DEEP\n")
    d = tmp_path / "d"
    _write(d / "a.txt", "in the tree\n")
    _write(d / "inner" / "b.txt", "also in the tree\n")
    os.symlink(outside, d / "x")  # a directory out of the tree
    os.symlink(outside / "shadow", d / "f.txt")  # a file out of the tree
    os.symlink("../../outside/sub/deep.txt", d / "inner" / "rel.txt")  # relative, climbing out
    os.symlink("../d/inner", d / "z_chain")  # in the tree through its parent: fine
    os.symlink("a.txt", d / "alias.txt")  # in the tree
    ds = load_documents([d])
    assert "SECRET" not in ds.text
    assert [f.path for f in ds.files] == ["d/a.txt", "d/inner/b.txt"]
    assert {"d/x/ (symlink out of d/, not followed)", "d/f.txt (symlink out of d/, not followed)",
            "d/inner/rel.txt (symlink out of d/, not followed)"} <= set(ds.skipped)
    assert "d/alias.txt (same file as d/a.txt)" in ds.skipped
    assert "d/z_chain/ (symlink to a directory already read)" in ds.skipped  # reached again as d/z_chain
    # named directly: the user's choice
    assert "SECRET-HASH" in load_documents([d / "f.txt"]).text
    assert "SECRET-DEEP" in load_documents([d / "x"]).text


def test_limits_and_encodings(tmp_path):
    big = _write(tmp_path / "big.txt", "x" * 1000)
    small = _write(tmp_path / "small.txt", "ok\n")
    u16 = _write(tmp_path / "u16.txt", "\ufeffwide text\r\n".encode("utf-16"))
    bom = _write(tmp_path / "bom.md", b"\xef\xbb\xbfwith bom\n")
    ds = load_documents([big, small, u16, bom], max_file_bytes=100)
    assert [f.path for f in ds.files] == ["small.txt", "u16.txt", "bom.md"]
    assert any("big.txt: 1,000 bytes is over the 100-byte limit" in w for w in ds.warnings)
    assert "=== u16.txt ===\nwide text\n" in ds.text
    assert "=== bom.md ===\nwith bom\n" in ds.text
    assert ds.summary().startswith("3 documents")
