"""Clean the gensim Wikipedia sample as DESIGN.md section 4 pins. Imports only gensim and the
standard library, so it can also run as a script beside an isolated gensim install:

    python _wikibuild.py ARTICLES.xml.bz2  -> JSON list of articles on stdout
"""

from __future__ import annotations

import bz2
import json
import re
import sys


def build(bz2_path: str) -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    arts = []
    with bz2.open(bz2_path, "rb") as f:
        for title, text, _pageid in extract_pages(f):
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            body = filter_wiki(text).replace("'''", "").replace("''", "")
            body = re.sub(r"\n{3,}", "\n\n", body).strip()
            if len(body) < 500:
                continue
            arts.append(f" = {title} =\n\n{body}")
    return arts


if __name__ == "__main__":
    json.dump(build(sys.argv[1]), sys.stdout)
