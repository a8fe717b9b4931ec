"""Did goldfish loss work? Memorization (extraction), membership inference and held-out loss.

Python API, for models already in memory (the experiments)::

    per_doc, aggregate = evaluate_memorization(model, tokenizer, docs_tokens, suffix_len=50)
    mia = membership_inference(model, tokenizer, member_tokens, nonmember_tokens)
    loss, ppl = heldout_loss(model, batches)
    write_report({"4-GL": {"memorization": {...}, "mia": mia, ...}}, out_dir)

Command line: ``python -m gf_jax.evaluate`` (``cli``). Modules: ``memorization`` (the extraction
protocol), ``scoring`` (losses without generating: MIA, held-out loss), ``metrics`` (plain numpy:
RougeL, exact match, AUC, TPR at a FPR), ``runs`` (saved models on chosen documents), ``report``
(report.json / report.md / plots). Imports run, data, model and the core below it.
"""

from gf_jax.evaluate.memorization import answer_memorization, evaluate_memorization, extraction_split
from gf_jax.evaluate.report import write_report
from gf_jax.evaluate.runs import EvalSettings, evaluate_run, resolve_documents
from gf_jax.evaluate.scoring import document_nll, heldout_loss, membership_inference

__all__ = [
    "extraction_split", "evaluate_memorization", "answer_memorization", "document_nll", "membership_inference",
    "heldout_loss", "write_report", "EvalSettings", "evaluate_run", "resolve_documents",
]
