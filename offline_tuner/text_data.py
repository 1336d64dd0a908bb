"""Real English text offline: the Wikipedia sample inside the gensim 4.4.0 wheel.

The wheel is only downloaded (``./run.sh setup`` does it, or :func:`gensim_wheel`), never
installed; its bz2 XML dump is read with zipfile, stripped of wiki markup and cached as JSON
under ``cache_root()/"text"``. Articles go to the calibration or the evaluation split by a
stable hash of their title, so the splits never share an article.
"""
from __future__ import annotations

import bz2
import hashlib
import html
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Callable, Literal

import torch

from signround_vllm.checkpoint import write_file_atomically
from offline_tuner.default_model import cache_root
from offline_tuner.events import Progress

Split = Literal["calibration", "evaluation"]

GENSIM_REQUIREMENT = "gensim==4.4.0"
GENSIM_WHEEL_GLOB = "gensim-4.4.0-*.whl"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Bump when the cleaning changes: the cache file name carries it.
CLEANER_VERSION = 1
EVALUATION_PERCENT = 20  # share of articles (by title hash) held out for evaluation
MIN_ARTICLE_CHARS = 500  # shorter cleaned articles are stubs or lists: skipped
DROPPED_SECTIONS = {"references", "see also", "external links", "further reading", "notes",
                    "bibliography", "sources", "footnotes", "notes and references", "citations"}
# Tags dropped with everything inside them.
DROPPED_ELEMENTS = ("ref", "math", "gallery", "timeline", "imagemap", "score", "syntaxhighlight",
                    "source", "table")
# Link prefixes of non-prose links: media, categories, interlanguage links like [[de:...]].
NON_PROSE_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?)\s*:", re.I)


class TextDataUnavailable(RuntimeError):
    """The Wikipedia sample cannot be found or downloaded."""


# ---- the wheel ---------------------------------------------------------------------------

def gensim_wheel(progress: Progress | None = None) -> Path:
    """The gensim wheel under ``cache_root()/"wheels"``, downloaded with pip if missing."""
    wheels = cache_root() / "wheels"
    found = sorted(wheels.glob(GENSIM_WHEEL_GLOB))
    if found:
        return found[-1]
    if progress:
        progress(f"downloading the {GENSIM_REQUIREMENT} wheel (about 28 MB) into {wheels}")
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           GENSIM_REQUIREMENT, "-d", str(wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(GENSIM_WHEEL_GLOB))
    if done.returncode != 0 or not found:
        raise TextDataUnavailable(
            f"could not download the {GENSIM_REQUIREMENT} wheel that holds the Wikipedia sample "
            f"(`{' '.join(cmd)}` exited with {done.returncode}: {done.stderr.strip()[-500:]}); "
            f"run `./run.sh setup` with access to the package index, or put the wheel in {wheels}")
    return found[-1]


def read_wiki_dump(wheel: Path) -> bytes:
    """The decompressed XML dump (about 6 MB) from inside the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        return bz2.decompress(zf.read(WIKI_MEMBER))


# ---- cleaning ----------------------------------------------------------------------------

def iter_pages(xml_dump: bytes):
    """Yield (title, namespace, is_redirect, wikitext) for each <page> of a MediaWiki dump."""
    for page in ET.fromstring(xml_dump).iter():
        if not page.tag.endswith("}page"):
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in page}
        text = next((el.text or "" for el in page.iter() if el.tag.endswith("}text")), "")
        yield (fields["title"].text or "", fields["ns"].text or "", "redirect" in fields, text)


def replace_balanced(text: str, opener: str, closer: str, render: Callable[[str], str]) -> str:
    """Replace each outermost ``opener ... closer`` span (nesting allowed) by ``render(inner)``.

    A stray closer is kept as text; an opener never closed is dropped, the text after it kept.
    """
    out, depth, start, pos = [], 0, 0, 0
    for m in re.finditer(re.escape(opener) + "|" + re.escape(closer), text):
        if m.group() == opener:
            if depth == 0:
                out.append(text[pos:m.start()])
                start = m.end()
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0:
                out.append(render(text[start:m.start()]))
                pos = m.end()
    out.append(text[pos:] if depth == 0 else replace_balanced(text[start:], opener, closer, render))
    return "".join(out)


def _render_link(inner: str) -> str:
    """[[target|label]] -> label, [[target]] -> target; media, category, language links -> ''."""
    if NON_PROSE_LINK.match(inner):
        return ""
    return inner.rsplit("|", 1)[-1] if "|" in inner else inner


def clean_wikitext(markup: str) -> str:
    """Readable prose from one article's wikitext (best effort, no external parser)."""
    text = re.sub(r"<!--.*?(-->|$)", "", markup, flags=re.S)
    for tag in DROPPED_ELEMENTS:
        text = re.sub(rf"<{tag}\b[^>]*/>", "", text, flags=re.I)
        text = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", text, flags=re.I | re.S)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)  # remaining HTML tags, content kept
    text = replace_balanced(text, "{{", "}}", lambda _: "")  # templates, infoboxes
    text = replace_balanced(text, "{|", "|}", lambda _: "")  # tables
    text = replace_balanced(text, "[[", "]]", _render_link)
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"'{2,}", "", text)  # bold, italics
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"__[A-Z]+__", "", text)  # __NOTOC__ and friends
    return _clean_lines(text)


def _clean_lines(text: str) -> str:
    """Headings to plain lines, list markers off, table debris and dropped sections out."""
    lines, dropping_level = [], 0  # lines: (heading level or 0 for body text, text)
    for raw in text.splitlines():
        line = re.sub(r"[ \t]+", " ", raw).strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*=+", line)
        if heading:
            level, title = min(len(heading.group(1)), 6), heading.group(2)
            if dropping_level and level > dropping_level:
                continue  # a subsection of a dropped section
            dropping_level = level if title.lower() in DROPPED_SECTIONS else 0
            if not dropping_level:
                lines.append((level, title))
            continue
        if dropping_level or line.startswith(("|", "!")):
            continue
        line = line.lstrip("*#:; ").strip()
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # parentheses left empty by dropped templates
        line = re.sub(r"\(\s*[,;]\s*", "(", line)
        line = re.sub(r" +([,.;:])", r"\1", line)
        lines.append((0, line))
    # Keep a heading only if text follows it before the next heading of its level or above.
    kept, body_after = [], [False] * 7  # body_after[L]: text follows, up to a heading of level <= L
    for level, line in reversed(lines):
        if level == 0:
            kept.append(line)
            body_after = [True] * 7 if line else body_after
            continue
        if body_after[level]:
            kept.append("\n" + line)
        body_after[level:] = [False] * (7 - level)
    text = "\n".join(reversed(kept))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def extract_articles(xml_dump: bytes) -> list[tuple[str, str]]:
    """(title, clean text) of every prose article: namespace 0, no redirects, no stubs."""
    articles = []
    for title, namespace, is_redirect, wikitext in iter_pages(xml_dump):
        if namespace != "0" or is_redirect or wikitext.lstrip().upper().startswith("#REDIRECT"):
            continue
        if "(disambiguation)" in title or re.search(r"\{\{\s*(disambig|dab\b)", wikitext, re.I):
            continue
        text = clean_wikitext(wikitext)
        if len(text) >= MIN_ARTICLE_CHARS:
            articles.append((title, text))
    return articles


# ---- cached articles and splits ----------------------------------------------------------

def _articles_cache_file() -> Path:
    return cache_root() / "text" / f"enwiki-sample-clean-v{CLEANER_VERSION}.json"


def load_articles(progress: Progress | None = None) -> list[tuple[str, str]]:
    """All cleaned (title, text) articles; cleaned once, then read from the JSON cache."""
    cache = _articles_cache_file()
    if cache.is_file():
        return [tuple(pair) for pair in json.loads(cache.read_text(encoding="utf-8"))]
    wheel = gensim_wheel(progress)
    if progress:
        progress(f"cleaning the Wikipedia sample from {wheel.name}")
    articles = extract_articles(read_wiki_dump(wheel))
    write_file_atomically(cache, json.dumps(articles, ensure_ascii=False))
    return articles


def split_of(title: str) -> Split:
    """The split an article belongs to, from a stable hash of its title."""
    bucket = int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big") % 100
    return "evaluation" if bucket < EVALUATION_PERCENT else "calibration"


def wikipedia_text(split: Split) -> str:
    """The articles of one split, joined with blank lines."""
    if split not in ("calibration", "evaluation"):
        raise ValueError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    return "\n\n".join(text for title, text in load_articles() if split_of(title) == split)


# ---- token windows -----------------------------------------------------------------------

def token_windows(tokenizer, text: str, n_windows: int, seq_len: int,
                  seed: int | None = 0) -> torch.LongTensor:
    """``[n_windows, seq_len]`` int64 token ids: non-overlapping windows of ``text``.

    The text is tokenized once without special tokens (no BOS). ``seed=None`` takes the first
    windows in order (evaluation); an integer seed picks distinct windows at random (calibration).
    """
    if n_windows < 1 or seq_len < 1:
        raise ValueError(f"n_windows and seq_len must be positive, got {n_windows} and {seq_len}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    available = len(ids) // seq_len
    if n_windows > available:
        raise ValueError(
            f"{n_windows} windows of {seq_len} tokens need {n_windows * seq_len} tokens, but the text "
            f"has {len(ids)} ({available} windows); ask for fewer or shorter windows, or give more text")
    windows = torch.tensor(ids[:available * seq_len], dtype=torch.long).view(available, seq_len)
    if seed is None:
        return windows[:n_windows].clone()
    picks = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n_windows]
    return windows[picks]


def read_text_file(path: str | Path) -> str:
    """Calibration text from a user file: `.txt` as is, `.jsonl` with a "text" field on each line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration file {p} not found")
    if p.suffix == ".txt":
        return p.read_text(errors="replace")
    if p.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{p}:{lineno}: each line must be an object with a string field \"text\"")
            texts.append(record["text"])
        return "\n\n".join(texts)
    raise ValueError(f"calibration file {p}: unsupported extension {p.suffix!r}; give a .txt or .jsonl file")


NEWS_MEMBER = "gensim/test/test_data/lee_background.cor"


def news_text() -> str:
    """Out-of-domain evaluation text: the Lee corpus of Australian news articles (one per line) in the
    gensim wheel. Never used for calibration."""
    with zipfile.ZipFile(gensim_wheel()) as zf:
        raw = zf.read(NEWS_MEMBER).decode("utf-8", errors="replace")
    return "\n\n".join(line.strip() for line in raw.splitlines() if line.strip())


# Standard-library modules whose documentation strings make the third evaluation text (technical prose,
# unlike both Wikipedia and news). Fixed list and order; the text depends on the Python version only.
DOC_MODULES = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "fractions", "functools",
               "heapq", "inspect", "itertools", "json", "logging", "pathlib", "pickle", "random", "re", "shutil",
               "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "unittest",
               "urllib.parse", "uuid", "zipfile")


# A second list, disjoint from DOC_MODULES: the selection text on which tuning defaults are chosen, so that
# the evaluation texts never decide them.
SELECTION_DOC_MODULES = ("abc", "ast", "base64", "bisect", "calendar", "configparser", "contextlib", "copy",
                         "dataclasses", "difflib", "enum", "fnmatch", "glob", "gzip", "hashlib", "ipaddress",
                         "operator", "optparse", "pprint", "queue", "sched", "shlex", "socket", "tempfile",
                         "timeit", "tokenize", "traceback", "typing", "warnings", "weakref")


def python_docs_text(modules: tuple[str, ...] = DOC_MODULES) -> str:
    """Out-of-domain text: documentation strings of standard-library modules and their public classes and
    functions (DOC_MODULES for evaluation, SELECTION_DOC_MODULES for choosing defaults). Never used for
    calibration."""
    import importlib
    import inspect

    parts = []
    for name in modules:
        module = importlib.import_module(name)
        doc = inspect.getdoc(module)
        if doc:
            parts.append(doc)
        for attr in sorted(getattr(module, "__all__", None) or [a for a in dir(module) if not a.startswith("_")]):
            obj = getattr(module, attr, None)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "").startswith(name):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 80:
                    parts.append(doc)
    return "\n\n".join(dict.fromkeys(parts))
