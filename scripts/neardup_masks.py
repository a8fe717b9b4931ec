"""How well does each goldfish mask keep near-duplicate copies' holes aligned, and at what cost?

For each mask setting (``h`` and ``key_window`` of the ``hash`` strategy) on real articles:

* **protected**: of the targets an article's own mask drops, the share that *every* one of N
  near-duplicate copies (``gf_jax.data.canaries.perturb``: word substitutions or insertions at a
  rate per 100 words) also drops or deletes: the tokens no copy ever supervises. Copies are
  aligned to the original token by token (``difflib``). Exact copies: 1.0 for every mask.
* **same fate**: of the pairs of occurrences of one 3-token phrase in two *different* articles,
  the share whose last token has the same fate. A mask that reads only the phrase gives 1.0 (the
  paper's objection to small h: a fixed phrase's last word may never be learned); independent
  fates give (1/k)^2 + (1 - 1/k)^2 = 0.625 at k = 4.
* **drop rate**: should be 1/k.

    python scripts/neardup_masks.py                      # 40 WikiText-2 articles, 16 copies, rates 5 and 20
    python scripts/neardup_masks.py --settings 13:0,2:0,2:64 --copies 50 --out /tmp/neardup
"""

from __future__ import annotations

import argparse
import difflib
import functools
import itertools
import json
import os
import sys
from collections import defaultdict

import jax
import numpy as np

from gf_jax import GoldfishConfig, goldfish_mask
from gf_jax.data.canaries import perturb
from gf_jax.data.sources import read_text_documents
from gf_jax.tokenizer import cached_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_settings(text: str) -> list[tuple[int, int]]:
    """``"13:0,2:64"`` -> [(h, key_window), ...]."""
    try:
        return [tuple(int(x) for x in item.split(":")) for item in text.split(",")]
    except ValueError:
        sys.exit(f"--settings {text!r} must be H:KEY_WINDOW pairs separated by commas, e.g. 13:0,2:64.")


@functools.partial(jax.jit, static_argnums=1)
def _mask(ids_1xT, config):
    return goldfish_mask(ids_1xT, config)


def drops(ids: list[int], config: GoldfishConfig) -> np.ndarray:
    """The mask of one whole document (one row, positions from 0). The row is padded to a multiple
    of 256 so that few shapes compile; the hash reads only earlier targets, so padding changes nothing."""
    padded = np.zeros(-(-len(ids) // 256) * 256, np.int32)
    padded[:len(ids)] = ids
    return np.asarray(_mask(padded[None], config))[0, :len(ids)]


def protected_share(articles_N, copies_by_article, config: GoldfishConfig) -> float:
    """Share of each original's dropped targets (past the first ``reach``) that no copy supervises."""
    kept = total = 0
    for original, copies in zip(articles_N, copies_by_article):
        dropped = drops(original, config)
        never_supervised = dropped.copy()
        for copy in copies:
            copy_dropped = drops(copy, config)
            matcher = difflib.SequenceMatcher(a=original, b=copy, autojunk=False)
            for a, b, n in matcher.get_matching_blocks():
                never_supervised[a:a + n] &= copy_dropped[b:b + n]
        settled = slice(config.reach, None)  # a document's first targets have short windows
        kept += int(never_supervised[settled].sum())
        total += int(dropped[settled].sum())
    return kept / max(total, 1)


def same_fate_share(articles_N, config: GoldfishConfig) -> tuple[float, int]:
    """(share of same-fate pairs, pairs) over 3-token phrases recurring across articles."""
    fates = defaultdict(list)
    for index, ids in enumerate(articles_N):
        dropped = drops(ids, config)
        for t in range(config.reach, len(ids)):
            fates[tuple(ids[t - 2:t + 1])].append((index, bool(dropped[t])))
    same = pairs = 0
    for occurrences in fates.values():
        for (a, fate_a), (b, fate_b) in itertools.combinations(occurrences[:50], 2):
            if a != b:
                pairs += 1
                same += fate_a == fate_b
    return same / max(pairs, 1), pairs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=os.path.join(REPO, "data", "wikitext2_valid.txt"))
    parser.add_argument("--articles", type=int, default=40)
    parser.add_argument("--words", type=int, default=200, help="each article is cut to this many words")
    parser.add_argument("--copies", type=int, default=16)
    parser.add_argument("--rates", default="5,20", help="edits per 100 words, comma-separated")
    parser.add_argument("--settings", default="13:0,3:0,2:0,2:64,1:64", help="H:KEY_WINDOW pairs")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--out", default=None, help="folder for results.json and results.md")
    args = parser.parse_args(argv)
    settings = parse_settings(args.settings)
    rates = [float(r) for r in args.rates.split(",")]

    docs = [d for d in read_text_documents(args.corpus, "wikitext") if len(d.text.split()) >= args.words]
    texts = [" ".join(d.text.split()[:args.words]) for d in docs[:args.articles]]
    tokenizer = cached_tokenizer([d.text for d in docs], args.vocab, os.path.join(REPO, ".cache", "tokenizers"))
    vocabulary = sorted({w for t in texts for w in t.split()})
    articles_N = tokenizer.encode(texts)
    copies = {rate: [tokenizer.encode([perturb(t, rate, np.random.default_rng([i, c]), vocabulary)
                                       for c in range(args.copies)]) for i, t in enumerate(texts)]
              for rate in rates}

    rows = []
    for h, key_window in settings:
        config = GoldfishConfig(k=args.k, h=h, key_window=key_window)
        same, pairs = same_fate_share(articles_N, config)
        rate_all = float(np.mean(np.concatenate([drops(ids, config)[config.reach:] for ids in articles_N])))
        row = {"h": h, "key_window": key_window, "drop_rate": rate_all, "same_fate": same, "phrase_pairs": pairs,
               "protected": {f"{r:g}": protected_share(articles_N, copies[r], config) for r in rates}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"articles": len(texts), "words": args.words, "copies": args.copies, "k": args.k, "rows": rows}
    markdown = to_markdown(result, rates)
    print(markdown)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(markdown)
    return result


def to_markdown(result: dict, rates: list[float]) -> str:
    head = "| h | key_window | " + " | ".join(f"protected @ {r:g} edits" for r in rates) + " | same fate | drop rate |"
    lines = [f"{result['articles']} articles of {result['words']} words, {result['copies']} near-duplicate copies "
             f"each, k = {result['k']}.", "", head, "|" + "---|" * (len(rates) + 4)]
    for row in result["rows"]:
        protected = " | ".join(f"{row['protected'][f'{r:g}']:.3f}" for r in rates)
        lines.append(f"| {row['h']} | {row['key_window'] or '-'} | {protected} | {row['same_fate']:.3f} "
                     f"({row['phrase_pairs']} pairs) | {row['drop_rate']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
