"""The docs hold together: every relative link in README.md and docs/*.md names a file
that exists and, with `#anchor`, a heading of that file (GitHub's anchors); the README
stays short."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(path: Path) -> set[str]:
  """GitHub's heading anchors of a markdown file (duplicates get -1, -2, ...)."""
  found, seen = set(), {}
  in_code = False
  for line in path.read_text().splitlines():
    if line.startswith("```"):
      in_code = not in_code
    if in_code or not line.startswith("#"):
      continue
    text = line.lstrip("#").strip().lower()
    slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    found.add(slug if n == 0 else f"{slug}-{n}")
  return found


def test_anchor_slugs_follow_github():
  doc = ROOT / "docs" / "pipeline.md"
  assert "predictions-on-new-images-configspredictpy" in anchors(doc)


def test_every_relative_link_and_anchor_resolves():
  broken = []
  for doc in DOCS:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    for target in LINK.findall(text):
      if re.match(r"[a-z]+://|mailto:", target):
        continue
      file, _, anchor = target.partition("#")
      path = (doc.parent / file).resolve() if file else doc
      if not path.exists():
        broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
      elif anchor and path.suffix == ".md" and anchor not in anchors(path):
        broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
  assert not broken, "\n".join(broken)


def test_the_readme_is_at_most_150_lines():
  assert len((ROOT / "README.md").read_text().splitlines()) <= 150
