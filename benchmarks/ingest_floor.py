"""What paper-mode ingestion costs at the least, against the budget of 2x gensim's segment_wiki.

On the same real-text dump as benchmarks/ingest.py (the embedded excerpt's
pages repeated ``--copies`` times, multistream with its index for ours, plain
for gensim), in one process, with models loaded before any clock starts, it
times each step that the libraries we build on must do, separately:

* ``read``: bz2 decompression and the XML parse into page texts (our shard
  reader on mwxml), the work that gensim's own reader also does;
* ``wikitext_tokenize``: mwparserfromhell's C tokenizer, timed inside the
  cleaner (it tokenizes what it renders of each article: its lead);
* ``senter``: spaCy's tokenizer and sentence recogniser over the text of the
  documents select_units keeps (a lower bound: every kept sentence has to be
  split, and more than the kept text is);
* ``wordpiece``: the encoder's WordPiece count of that text;

then the steps in full: ``clean`` (extract_docs' cleaner over the same
pages), the whole of extract_docs + select_units (paper mode), and gensim
``segment_wiki -w 1`` on the plain dump (wall and CPU: gensim reads in a
second process).

The budget is what 2x gensim's articles per second allows for our articles.
When the library floor (the sum of the first four) is near the budget, the
target cannot be met by making our own code faster. Prints JSON, then a table.

    .venv/bin/python benchmarks/ingest_floor.py [--copies 20] [--pages-per-shard 100]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _timed(fn):
    w, c = time.perf_counter(), _cpu()
    out = fn()
    return out, round(time.perf_counter() - w, 2), round(_cpu() - c, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=20, help="copies of the 206-page excerpt (20: 4,120 pages)")
    ap.add_argument("--pages-per-shard", type=int, default=100)
    ap.add_argument("--splitter", default="senter", choices=["senter", "parser"])
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ingest  # benchmarks/ingest.py: the same dump and the same gensim run
    import polars as pl

    from tasks import wikitext
    from tasks.common import Funnel, freeze_long_lived
    from tasks.extract_docs import ExtractConfig, _iter_shard_pages, extract_docs
    from tasks.select_units import UnitConfig, count_tokens, load_senter, load_tokenizer, select_units
    from tasks.shard import ShardConfig, plan_shards

    figures: dict = {"copies": args.copies, "splitter": args.splitter}
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        tmp = Path(tmp)
        multistream, plain = ingest.build_dumps(args.copies, tmp / "dump")
        shards = plan_shards(multistream, ShardConfig(pages_per_shard=args.pages_per_shard), work_dir=tmp / "plan")
        extract, units = ExtractConfig(), UnitConfig(docs_per_article=1, sentence_splitter=args.splitter)
        # Models load before any clock starts: the steps are per-article costs.
        nlp, tokenizer = load_senter(units.spacy_model), load_tokenizer(units.tokenizer_path)

        def read():
            return [(page, (rev.text if rev is not None else None) or "") for s in shards for page, rev in _iter_shard_pages(s)]

        pages, figures["read_s"], figures["read_cpu_s"] = _timed(read)
        freeze_long_lived()  # as a worker does: the pages held here must not slow the garbage collector's walks
        budget = max(extract.max_chars or 0, extract.min_text_chars) or None
        article_texts = [t for p, t in pages if p.namespace == 0 and p.redirect is None and not t.lstrip()[:9].upper() == "#REDIRECT"]
        # The tokenizer's own time inside the cleaner: it tokenizes a lead section by section, and one
        # call over the same characters takes longer (mwparserfromhell's tokenizer backtracks further).
        tokenizer_class, tokenize_s = wikitext._Tokenizer, [0.0]

        class TimedTokenizer:
            def tokenize(self, *args):
                start = time.perf_counter()
                try:
                    return tokenizer_class().tokenize(*args)
                finally:
                    tokenize_s[0] += time.perf_counter() - start

        wikitext._Tokenizer = TimedTokenizer
        try:
            _, figures["clean_s"], figures["clean_cpu_s"] = _timed(lambda: [wikitext.clean_wikitext(t, budget) for t in article_texts])
        finally:
            wikitext._Tokenizer = tokenizer_class
        figures["wikitext_tokenize_s"] = round(tokenize_s[0], 2)

        def whole():
            out, kept = [], 0
            for s in shards:
                a = extract_docs(s, extract, tmp / "work")
                kept += Funnel.load(a / "funnel.json").get("extract_docs", "kept")
                out.append(select_units([a], units, tmp / "work"))
            return out, kept

        (folders, kept_articles), figures["ours_s"], figures["ours_cpu_s"] = _timed(whole)
        docs = pl.concat([pl.read_parquet(f / "documents.parquet", columns=["page_id", "text"]) for f in folders])
        texts = docs["text"].to_list()
        _, figures["senter_s"], _ = _timed(lambda: list(nlp.pipe(texts, batch_size=units.batch_size)))
        _, figures["wordpiece_s"], _ = _timed(lambda: count_tokens(tokenizer, texts))
        figures.update(pages=len(pages), articles=kept_articles, documents=len(texts),
                       document_chars=sum(map(len, texts)))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        gensim = ingest.child_gensim(str(plain), 1)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    figures["gensim_s"], figures["gensim_articles"] = round(gensim["wall_s"], 2), gensim["articles"]
    figures["gensim_cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 2)
    # 2x gensim's articles per second (per CPU second), for our number of articles.
    share = figures["articles"] / figures["gensim_articles"] / 2
    figures["budget_s"], figures["budget_cpu_s"] = round(figures["gensim_s"] * share, 2), round(figures["gensim_cpu_s"] * share, 2)
    figures["floor_s"] = round(sum(figures[k] for k in ("read_s", "wikitext_tokenize_s", "senter_s", "wordpiece_s")), 2)
    figures["floor_over_budget"] = round(figures["floor_s"] / figures["budget_s"], 2)
    figures["ours_over_budget"] = round(figures["ours_s"] / figures["budget_s"], 2)
    figures["ours_vs_gensim"] = round(figures["gensim_s"] / figures["gensim_articles"] / (figures["ours_s"] / figures["articles"]), 2)
    figures["ours_vs_gensim_per_cpu_s"] = round(
        figures["gensim_cpu_s"] / figures["gensim_articles"] / (figures["ours_cpu_s"] / figures["articles"]), 2)
    print(json.dumps(figures, indent=2))
    print(f"\n{figures['pages']} pages, {figures['articles']} articles, {figures['documents']} documents "
          f"({figures['document_chars']:,} characters); one process, models loaded before timing\n")
    print("| step | wall s | share of the 2x-gensim budget |")
    print("|---|---:|---:|")
    for name in ("read", "wikitext_tokenize", "senter", "wordpiece", "floor", "clean", "ours"):
        print(f"| {name} | {figures[name + '_s']:.2f} | {figures[name + '_s'] / figures['budget_s']:.2f} |")
    print(f"| gensim segment_wiki -w 1 ({figures['gensim_articles']} articles; {figures['gensim_cpu_s']:.2f} CPU s) | {figures['gensim_s']:.2f} | |")
    print(f"| budget: 2x gensim's articles/s for {figures['articles']} articles | {figures['budget_s']:.2f} | 1.00 |")
    print(f"\nours vs gensim, articles per second: {figures['ours_vs_gensim']}x wall, {figures['ours_vs_gensim_per_cpu_s']}x per CPU second")


if __name__ == "__main__":
    main()
