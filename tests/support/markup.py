"""HTML test input and the definition html_to_text is held to: message.py's regular
expressions (the code itself uses linear-time equivalents of two of them)."""

from __future__ import annotations

import html

from hypothesis import strategies as st

from atlas_milter.message import _HREF_RE, _IMG_RE, _SCRIPT_STYLE_RE, _TAG_RE


def html_reference(markup: str) -> tuple[str, list[str], int]:
    """(text, links, <img> count) of `markup` as the regular expressions define them."""
    text = _TAG_RE.sub(" ", _SCRIPT_STYLE_RE.sub(" ", markup))
    return html.unescape(text), _HREF_RE.findall(markup), len(_IMG_RE.findall(markup))


# What the HTML rules look at: tags, scripts, styles and comments (closed, unclosed, in other
# cases, with the letters re's IGNORECASE adds: İ ı ſ), href= and src= in their spellings,
# quotes, white space of several kinds, and text between.
HTMLISH = st.lists(
    st.one_of(
        st.sampled_from(["<", ">", "</", "<script>", "</script>", "</SCRIPT >", "<style type=x>", "</style\n>",
                         "<scrİpt>", "</scrıpt>", "</script\u2028>", "<ſtyle>", "</ſtyle>", "<scripts>", "<!--", "-->",
                         "<img", "<IMG src=a.png>", "<İmg", "<img_", "href=", "HREF = '", "src=\"", "ſrc=", "xhref=",
                         "&amp;", "<p>", "<a href=\"http://x.example/?a=b\">"]),
        st.text(alphabet=st.sampled_from(list("ab =\"'<>/-!\t\n") + ["é", "\u00a0", "中"]), max_size=8),
    ),
    max_size=16,
).map("".join)

# Markup where the linear-time code could part from the regular expressions.
HTML_EDGES = [
    "<a href=" + "x" * 400 + ">link</a>",  # a link longer than 300 characters is cut there
    "<" + "x" * 4001 + "> <" + "y" * 4000 + ">",  # a tag longer than 4000 characters is not one
    "<" * 5000 + "> <" + "z" * 4100 + "> <q>",  # runs without ">" longer than a tag can be
    "<script>never closed <b>bold</b>", "<!-- never closed <b>bold</b>", "<!--> a --> b",
    "<script>a</style><style>b</script></style></script>", "<!-- a <script> b --> c </script>",
    "<scrİpt>a</script> <scrıpt>b</script> <scrıpt>c</scrıpt> <ſtyle>d</ſtyle> <STYLE>e</style\u2028>",
    "<a href=x<img src=y.png>>", "<img><img/><imgx><img\u00a0",
]
