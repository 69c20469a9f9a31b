"""Every document the code, the README and the docs point to exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_cited_doc_exists():
    sources = [*REPO.glob("makd/**/*.py"), *REPO.glob("benchmarks/*.py"), REPO / "README.md", *REPO.glob("docs/*.md")]
    cited = {(src.relative_to(REPO), ref) for src in sources
             for ref in re.findall(r"\bdocs/[\w./-]+?\.md\b", src.read_text(encoding="utf-8"))}
    assert len(cited) >= 5  # the README and modules do cite docs
    missing = sorted(f"{src}: {ref}" for src, ref in cited if not (REPO / ref).is_file())
    assert not missing
