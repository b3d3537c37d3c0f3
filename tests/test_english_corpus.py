"""tools/build_english_corpus.py's readers on small inputs made here (the real build downloads ~110 MB of packages
and is run by hand: tests/gpu/README.md): markup to prose, the two binary containers it decodes itself, and the
held-out split."""
import gzip
import struct
import sys
import zlib

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import build_english_corpus as corpus  # noqa: E402


def test_rst_keeps_prose_and_notes_and_drops_code_directives_and_tables():
    source = """Title
=====

Use :func:`os.path.join` and ``open()`` with a `link <https://x.org>`_ here::

    code = "dropped"

.. note::

   Notes are text and stay.

.. code-block:: c

   int dropped;

.. toctree::
   :maxdepth: 2

   dropped/page

=====  =====
a      b
=====  =====

Last :ref:`words <target>` and :class:`~a.b.Widget`.
"""
    assert corpus.rst_to_text(source) == ("Title\n\nUse os.path.join and open() with a link here:\n\n"
                                          "Notes are text and stay.\n\nLast words and Widget.\n")


def test_pod_keeps_headings_and_paragraphs_and_drops_verbatim_code():
    source = "=head1 NAME\n\nperlfoo - C<< $a->b >> and L<perlsyn/Loops> E<gt> I<it>\n\n    my $dropped = 1;\n\n" \
             "=begin html\n\n<p>dropped</p>\n\n=end html\n\n=cut\n"
    assert corpus.pod_to_text(source) == "NAME\n\nperlfoo - $a->b and Loops in perlsyn > it\n"


def test_html_keeps_inline_code_and_drops_navigation_and_preformatted_blocks():
    page = ('<html><head><title>t</title></head><body><div class="navheader">Prev Next</div>'
            '<p>Use <code class="literal">SELECT</code> here.</p><pre>dropped;</pre><p>Second.</p></body></html>')
    assert corpus.html_to_text(page) == "Use SELECT here.\n\nSecond.\n"


def test_osis_drops_notes_and_keeps_titles_on_their_own_lines():
    block = ('<title type="main">Genesis</title><chapter n="1"/><w lemma="strong:H7225">In the beginning</w> God'
             '<note type="x-footnote">dropped</note> created.<lb/>Second line &amp; more.')
    assert corpus.osis_to_text(block) == "Genesis\n\nIn the beginning God created.\nSecond line & more.\n"


def test_sword_blocks_are_read_from_the_block_index(tmp_path):
    """zText / zCom: .bzs holds (offset, compressed size, size) per block of the zlib .bzz; zCom4 the same as .czs."""
    for letter, testament, texts in (("b", "ot", ["first book", "second book"]), ("c", "nt", ["third"])):
        data, index = b"", b""
        for text in texts:
            packed = zlib.compress(text.encode())
            index += struct.pack("<III", len(data), len(packed), len(text))
            data += packed
        (tmp_path / f"{testament}.{letter}zz").write_bytes(data)
        (tmp_path / f"{testament}.{letter}zs").write_bytes(index + struct.pack("<III", len(data), 0, 0))  # empty
    assert list(corpus.sword_blocks(tmp_path)) == ["first book", "second book", "third"]


def _word(*values):
    return struct.pack(f">{len(values)}i", *values)


def _chars(text):
    return _word(0x00040009, len(text.encode())) + text.encode()  # CHARSXP, UTF-8


def _strings(items):
    return _word(16, len(items)) + b"".join(_chars(s) for s in items)  # STRSXP


def _named_list(serialized, names):
    """VECSXP with a names attribute (a tagged pairlist: names = STRSXP, then NILVALUE)."""
    return (_word(19 | 1 << 9, len(serialized)) + b"".join(serialized)
            + _word(2 | 1 << 10, 1) + _chars("names") + _strings(names) + _word(254))


R_HEADER = b"X\n" + _word(3, 0x040201, 0x030500, 5) + b"UTF-8"  # XDR, version 3, the native encoding's name


def test_r_lazy_load_data_reads_named_character_vectors(tmp_path):
    """janeaustenr's novels: data/Rdata.rdb entries (4-byte length, zlib) indexed by the gzipped Rdata.rdx."""
    emma = R_HEADER + _strings(["EMMA", "", "By Jane Austen"])
    entry = struct.pack(">I", len(emma)) + zlib.compress(emma)
    (tmp_path / "Rdata.rdb").write_bytes(entry)
    offsets = _word(13, 2, 0, len(entry))  # INTSXP c(offset, length)
    index = R_HEADER + _named_list([_named_list([offsets], ["emma"])], ["variables"])
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    assert corpus.r_lazy_data(tmp_path) == {"emma": ["EMMA", "", "By Jane Austen"]}


def test_hold_out_is_whole_documents_by_title_hash_and_never_a_whole_source():
    docs = [(f"doc {i}", "word " * (50 + 10 * i)) for i in range(40)]
    train, valid = corpus.hold_out("src", docs, 0.05)
    assert sorted(train + valid) == sorted(docs) and valid
    held = sum(len(t) for _, t in valid)
    assert held >= 0.05 * sum(len(t) for _, t in docs) > held - max(len(t) for _, t in valid)
    assert corpus.hold_out("src", list(reversed(docs)), 0.05)[1] == list(reversed(valid))  # by title, not order
    assert corpus.hold_out("src", docs[:1], 0.5) == (docs[:1], [])  # one document: a quarter rule keeps it
