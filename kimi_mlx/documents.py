"""Document ingestion: files, PDFs and source trees -> one deterministic text block.

The rendered block is placed first in the token stream, so a saved document
session is only reusable if the same inputs always render to byte-identical
text. Everything here is therefore ordered and normalised deterministically:

* inputs keep the order the user gave them; files inside a directory are
  sorted by their path components;
* headers use short display paths (``name`` for a file, ``root/rel/path`` for
  a file inside a directory), not absolute paths, so the rendering does not
  depend on the current directory;
* line endings are normalised to ``\\n`` and a UTF-8 BOM is dropped.

Inside a directory, a symlink is followed only when its target stays inside
that directory; others are listed in ``skipped``. A file or directory named
directly is read wherever it points: that is the user's choice.

Each document renders as::

    === path/relative/to/root ===
    <text, ending with a newline>
    <blank line>

PDF text is extracted with pypdf (the optional ``pdf`` extra), one
``--- page N ---`` marker per page.
"""
from __future__ import annotations

import fnmatch
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import pathspec

__all__ = [
    "DocFile",
    "DocumentSet",
    "DocumentError",
    "load_documents",
    "DEFAULT_MAX_FILE_BYTES",
    "SKIP_DIRS",
]

PathLike = Union[str, "os.PathLike[str]"]

# 64 MiB: far above what fits in a 1M-token context (~4 MB of text), but a
# guard against accidentally slurping a data dump. PDFs count their file size.
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024

# Version-control metadata and build/cache/dependency directories: never
# useful to the model and often huge.
SKIP_DIRS = frozenset(
    {
        ".git", ".hg", ".svn", ".bzr", "CVS",
        "node_modules", "bower_components", "__pycache__", ".venv", "venv",
        ".tox", ".nox", ".eggs", "build", "dist", "target",
        ".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis",
        ".cache", ".gradle", ".idea", ".vscode", ".next", ".nuxt",
        ".parcel-cache", ".ipynb_checkpoints", ".terraform",
        "htmlcov", ".coverage_html", "site-packages",
    }
)
_SKIP_DIR_GLOBS = ("*.egg-info", "*.dist-info")

# Generated files that are text but pure noise for a reader.
SKIP_FILES = frozenset(
    {
        ".DS_Store", "package-lock.json", "yarn.lock", "pnpm-lock.yaml",
        "Cargo.lock", "poetry.lock", "uv.lock", "Pipfile.lock",
        "composer.lock", "Gemfile.lock", "go.sum",
    }
)

_MARKDOWN_EXT = {".md", ".markdown", ".mdx", ".rst", ".adoc", ".org"}
_TEXT_EXT = {".txt", ".text", ".log", ".csv", ".tsv", ""}
_SOURCE_EXT = {
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".m",
    ".mm", ".metal", ".cu", ".cuh", ".rs", ".go", ".java", ".kt", ".kts",
    ".scala", ".swift", ".js", ".mjs", ".cjs", ".jsx", ".ts", ".tsx", ".rb",
    ".php", ".pl", ".pm", ".lua", ".r", ".jl", ".hs", ".ml", ".mli", ".ex",
    ".exs", ".erl", ".clj", ".cs", ".fs", ".vb", ".dart", ".zig", ".nim",
    ".sh", ".bash", ".zsh", ".fish", ".ps1", ".bat", ".sql", ".html", ".htm",
    ".css", ".scss", ".sass", ".less", ".vue", ".svelte", ".json", ".jsonc",
    ".yaml", ".yml", ".toml", ".ini", ".cfg", ".conf", ".xml", ".proto",
    ".graphql", ".tex", ".cmake", ".mk", ".gradle", ".tf", ".nix", ".ipynb",
}
_SOURCE_NAMES = {"makefile", "dockerfile", "cmakelists.txt", "justfile", "rakefile"}

# Sniff this much for NUL bytes; decoding problems are judged on the whole file.
_SNIFF_BYTES = 8192
# Invalid UTF-8 plus control characters above this share of the text: binary.
# (Legacy-encoded prose such as Latin-1 French stays well below it.)
_MAX_BAD_FRACTION = 0.10
_CONTROL_RE = re.compile(r"[\x01-\x08\x0e-\x1a\x1c-\x1f\x7f]")


class DocumentError(ValueError):
    """Raised for unusable input: missing paths, nothing readable, missing pypdf."""


@dataclass(frozen=True)
class DocFile:
    """One included document.

    path:  the display path used in the header (not an absolute path).
    kind:  "text", "markdown", "source" or "pdf".
    chars: characters of extracted text (header excluded).
    bytes: size of the file on disk.
    """

    path: str
    kind: str
    chars: int
    bytes: int


@dataclass
class DocumentSet:
    """Result of :func:`load_documents`.

    text:     the exact block fed to the model (same as :meth:`render`).
    files:    included documents, in render order.
    warnings: problems worth showing the user (unreadable, undecodable, ...).
    skipped:  display paths left out on purpose (binaries, ignored, duplicates),
              each with its reason; informative, not a problem.
    """

    text: str
    files: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def render(self) -> str:
        """The documents block exactly as it goes into the prompt."""
        return self.text

    @property
    def total_chars(self) -> int:
        return sum(f.chars for f in self.files)

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    def summary(self) -> str:
        n = len(self.files)
        s = f"{n} document{'s' if n != 1 else ''}, {self.total_chars:,} characters"
        if self.skipped:
            s += f", {len(self.skipped)} skipped"
        if self.warnings:
            s += f", {len(self.warnings)} warning{'s' if len(self.warnings) != 1 else ''}"
        return s


# --------------------------------------------------------------------------
# .gitignore matching
# --------------------------------------------------------------------------


class _IgnoreFile:
    """The rules of one .gitignore, relative to the directory holding it."""

    def __init__(self, base: Path, lines: list):
        self.base = base
        self._spec = pathspec.GitIgnoreSpec.from_lines(lines)

    def decide(self, path: Path, is_dir: bool) -> Optional[bool]:
        """True: ignored, False: re-included by "!", None: no rule matched."""
        try:
            rel = path.relative_to(self.base).as_posix()
        except ValueError:
            return None
        return self._spec.check_file(rel + "/" if is_dir else rel).include


def _load_ignore_file(dirpath: Path, warnings: list, display: str) -> Optional[_IgnoreFile]:
    gi = dirpath / ".gitignore"
    try:
        if not gi.is_file():
            return None
        lines = _read_bytes(gi).decode("utf-8", errors="replace").splitlines()
    except OSError as e:
        warnings.append(f"{display}: could not read .gitignore ({_oserror_text(e)})")
        return None
    return _IgnoreFile(dirpath, lines)


def _is_ignored(rules: Sequence[_IgnoreFile], path: Path, is_dir: bool) -> bool:
    # Deeper .gitignore files override shallower ones, as in git.
    for rule in reversed(rules):
        d = rule.decide(path, is_dir)
        if d is not None:
            return d
    return False


def _ancestor_ignores(root: Path, warnings: list) -> list:
    """.gitignore files between the enclosing git work tree (if any) and root."""
    if (root / ".git").exists():
        return []  # root is a work tree's top: outer rules don't apply
    chain = []
    cur = root.parent
    while True:
        chain.append(cur)
        if (cur / ".git").exists():
            break
        if cur.parent == cur:
            return []  # not inside a git work tree: parents' rules don't apply
        cur = cur.parent
    rules = []
    for d in reversed(chain):
        r = _load_ignore_file(d, warnings, str(d))
        if r is not None:
            rules.append(r)
    return rules


# --------------------------------------------------------------------------
# reading files
# --------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    """All file reads go through here (tests patch it to simulate failures)."""
    with open(path, "rb") as f:
        return f.read()


def _oserror_text(e: OSError) -> str:
    return e.strerror or e.__class__.__name__


def _kind_for(path: Path) -> str:
    ext = path.suffix.lower()
    if ext == ".pdf":
        return "pdf"
    if ext in _MARKDOWN_EXT:
        return "markdown"
    if ext in _SOURCE_EXT or path.name.lower() in _SOURCE_NAMES:
        return "source"
    return "text"


def _normalise(text: str) -> str:
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _decode(data: bytes) -> "tuple[Optional[str], Optional[str]]":
    """Decode file bytes. Returns (text, problem); text None means binary."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16"), None
        except UnicodeDecodeError:
            return None, "binary"
    if b"\x00" in data[:_SNIFF_BYTES]:
        return None, "binary"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if bad + len(_CONTROL_RE.findall(text)) > len(text) * _MAX_BAD_FRACTION:
        return None, "binary"
    return text, f"not valid UTF-8; {bad} undecodable byte sequence(s) replaced"


def _pdf_text(path: Path, display: str, warnings: list) -> Optional[str]:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise DocumentError(
            f"{display}: reading PDF files needs the optional 'pypdf' package "
            "(pip install 'kimi-mlx[pdf]' or pip install pypdf)"
        ) from None
    import io

    try:
        reader = PdfReader(io.BytesIO(_read_bytes(path)))
        if reader.is_encrypted:
            try:
                reader.decrypt("")
            except Exception:
                pass
        pages = []
        empty = 0
        for i, page in enumerate(reader.pages, 1):
            t = _normalise(page.extract_text() or "").strip("\n")
            if not t.strip():
                empty += 1
            pages.append(f"--- page {i} ---\n{t}" if t else f"--- page {i} ---")
    except OSError as e:
        warnings.append(f"{display}: unreadable ({_oserror_text(e)}); skipped")
        return None
    except Exception as e:  # pypdf raises many kinds of errors on bad files
        warnings.append(f"{display}: could not extract PDF text ({type(e).__name__}: {e}); skipped")
        return None
    if not pages or empty == len(pages):
        warnings.append(
            f"{display}: PDF has no extractable text (scanned images need OCR); skipped"
        )
        return None
    if empty:
        warnings.append(f"{display}: {empty} of {len(pages)} PDF pages have no extractable text")
    return "\n".join(pages)


# --------------------------------------------------------------------------
# collecting inputs
# --------------------------------------------------------------------------


@dataclass
class _Candidate:
    path: Path  # real filesystem path
    display: str  # header path
    explicit: bool  # named directly by the user (errors are louder)


def _display_prefixes(resolved: list) -> list:
    """Shortest unique tail of each input's path: 'notes.md', 'a/notes.md', ..."""
    k = [1] * len(resolved)

    def tail(i):
        parts = resolved[i].parts
        # the filesystem root has no name; fall back to the full path
        return "/".join(parts[-k[i]:]) if resolved[i].name else resolved[i].as_posix()

    for _ in range(64):
        names = [tail(i) for i in range(len(resolved))]
        dup = {n for n in names if names.count(n) > 1}
        if not dup:
            return names
        changed = False
        for i, n in enumerate(names):
            if n in dup and k[i] < len(resolved[i].parts):
                k[i] += 1
                changed = True
        if not changed:
            return names  # same path given twice; deduplicated later
    return [tail(i) for i in range(len(resolved))]


def _skip_dir_name(name: str) -> bool:
    return name in SKIP_DIRS or any(fnmatch.fnmatchcase(name, g) for g in _SKIP_DIR_GLOBS)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk_tree(root: Path, prefix: str, out: list, warnings: list, skipped: list) -> None:
    """Collect the files of a source tree in sorted order, honouring .gitignore."""
    visited_dirs = set()
    base_rules = _ancestor_ignores(root, warnings)
    real_root = os.path.realpath(root)

    def visit(dirpath: Path, rel_parts: tuple, rules: list):
        display_dir = "/".join((prefix,) + rel_parts)
        try:
            st = dirpath.stat()
        except OSError as e:
            warnings.append(f"{display_dir}/: unreadable directory ({_oserror_text(e)}); skipped")
            return
        key = (st.st_dev, st.st_ino)
        if key in visited_dirs:
            # a symlink back into the tree (or a loop): read each directory once
            skipped.append(f"{display_dir}/ (symlink to a directory already read)")
            return
        visited_dirs.add(key)

        own = _load_ignore_file(dirpath, warnings, display_dir + "/.gitignore")
        if own is not None:
            rules = rules + [own]
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            warnings.append(f"{display_dir}/: unreadable directory ({_oserror_text(e)}); skipped")
            return
        for entry in entries:
            name = entry.name
            path = dirpath / name
            parts = rel_parts + (name,)
            display = "/".join((prefix,) + parts)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                is_link = entry.is_symlink()
            except OSError:
                is_dir, is_link = False, entry.is_symlink()
            if is_link and not _inside(os.path.realpath(path), real_root):
                # `ln -s /etc d/x` must not put /etc/shadow into the prompt
                skipped.append(f"{display}{'/' if is_dir else ''} (symlink out of {prefix}/, not followed)")
                continue
            if is_dir:
                if _skip_dir_name(name):
                    continue  # build/cache/VCS dirs: silently, they are expected
                if _is_ignored(rules, path, True):
                    skipped.append(f"{display}/ (.gitignore)")
                    continue
                visit(path, parts, rules)
                continue
            if name in SKIP_FILES:
                skipped.append(f"{display} (generated file)")
                continue
            if _is_ignored(rules, path, False):
                skipped.append(f"{display} (.gitignore)")
                continue
            try:
                fst = path.stat()
            except OSError as e:
                if is_link:
                    warnings.append(f"{display}: broken symlink; skipped")
                else:
                    warnings.append(f"{display}: unreadable ({_oserror_text(e)}); skipped")
                continue
            if not stat.S_ISREG(fst.st_mode):
                # FIFOs, sockets, devices: reading could block forever
                skipped.append(f"{display} (not a regular file)")
                continue
            out.append(_Candidate(path, display, explicit=False))

    visit(root, (), base_rules)


def load_documents(
    paths: Sequence[PathLike],
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    on_progress: Optional[Callable[[int, int, str], None]] = None,
) -> DocumentSet:
    """Read files, PDFs and directory trees into one deterministic text block.

    paths: files or directories, rendered in the given order (directory
        contents sorted). ``~`` is expanded.
    max_file_bytes: files larger than this are skipped with a warning.
    on_progress: called as ``on_progress(done, total, display_path)`` after
        each file is read.

    Raises DocumentError for a missing path, an empty ``paths`` list, a PDF
    named directly while pypdf is missing, or when no text is left at all.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise DocumentError("no documents given")

    warnings: list = []
    skipped: list = []
    candidates = _candidates(paths, warnings, skipped)
    files: list = []
    blocks: list = []
    seen_files: dict = {}
    n_binary = 0
    total = len(candidates)
    for done, cand in enumerate(candidates, 1):
        status, got = _read_candidate(cand, max_file_bytes, warnings, skipped, seen_files)
        if status == "binary" and not cand.explicit:
            n_binary += 1
        elif status == "ok":
            text, size, kind = got
            if text.strip():
                if not text.endswith("\n"):
                    text += "\n"
                blocks.append(f"=== {cand.display} ===\n{text}\n")
                files.append(DocFile(cand.display, kind, len(text), size))
            else:
                skipped.append(f"{cand.display} (empty)")
                if cand.explicit:
                    warnings.append(f"{cand.display}: file is empty")
        if on_progress is not None:
            on_progress(done, total, cand.display)

    if n_binary:
        # one line, not one warning per image/object file in a tree
        warnings.append(f"skipped {n_binary} binary file{'s' if n_binary != 1 else ''}")
    if not files:
        names = ", ".join(str(p) for p in paths)
        detail = f" ({'; '.join(warnings)})" if warnings else ""
        raise DocumentError(f"no readable text found in {names}{detail}")
    return DocumentSet(text="".join(blocks), files=files, warnings=warnings, skipped=skipped)


def _candidates(paths: list, warnings: list, skipped: list) -> list:
    """The files to read, in order: each path as given, a directory's tree sorted (without what
    .gitignore and SKIP_DIRS leave out). DocumentError for a missing or special path."""
    inputs = []
    for p in paths:
        # absolute (not resolved) so .gitignore bases compare consistently
        path = Path(os.path.abspath(Path(os.fspath(p)).expanduser()))
        if not path.exists():
            if path.is_symlink():
                raise DocumentError(f"{p}: broken symlink")
            raise DocumentError(f"{p}: no such file or directory")
        inputs.append((p, path))
    # named by the path as given (made absolute), not the symlink target
    prefixes = _display_prefixes([path for _, path in inputs])

    candidates: list = []
    for (orig, path), prefix in zip(inputs, prefixes):
        if path.is_dir():
            before = len(candidates)
            _walk_tree(path, prefix, candidates, warnings, skipped)
            if len(candidates) == before:
                warnings.append(f"{prefix}/: no readable files found in this directory")
        else:
            try:
                st = path.stat()
            except OSError as e:
                raise DocumentError(f"{orig}: cannot access ({_oserror_text(e)})") from None
            if not stat.S_ISREG(st.st_mode):
                raise DocumentError(f"{orig}: not a regular file or directory")
            candidates.append(_Candidate(path, prefix, explicit=True))
    return candidates


def _read_candidate(cand, max_file_bytes, warnings, skipped, seen_files):
    """Returns ("ok", (text, size, kind)), ("binary", None) or ("skip", None)."""
    display = cand.display
    try:
        st = cand.path.stat()
    except OSError as e:
        warnings.append(f"{display}: unreadable ({_oserror_text(e)}); skipped")
        return "skip", None
    key = (st.st_dev, st.st_ino)
    if key in seen_files:
        first = seen_files[key]
        skipped.append(f"{display} (already included)" if first == display
                       else f"{display} (same file as {first})")
        return "skip", None
    seen_files[key] = display
    if st.st_size > max_file_bytes:
        warnings.append(
            f"{display}: {st.st_size:,} bytes is over the {max_file_bytes:,}-byte limit; skipped"
        )
        return "skip", None
    kind = _kind_for(cand.path)
    if kind == "pdf":
        try:
            text = _pdf_text(cand.path, display, warnings)
        except DocumentError:
            if cand.explicit:
                raise
            warnings.append(f"{display}: skipped (PDF support needs 'pypdf': pip install pypdf)")
            return "skip", None
        return ("skip", None) if text is None else ("ok", (text, st.st_size, kind))
    try:
        data = _read_bytes(cand.path)
    except OSError as e:
        warnings.append(f"{display}: unreadable ({_oserror_text(e)}); skipped")
        return "skip", None
    text, problem = _decode(data)
    if text is None:
        skipped.append(f"{display} (binary)")
        if cand.explicit:
            warnings.append(f"{display}: looks like a binary file; skipped")
        return "binary", None
    if problem:
        warnings.append(f"{display}: {problem}")
    return "ok", (_normalise(text), len(data), kind)
