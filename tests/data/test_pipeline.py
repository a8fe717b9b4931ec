"""Data pipeline: sources, splitting, canaries, packing with true positions, determinism, resume,
per-host split, single-pass evaluation, TFDS (ArrayRecord, built locally) and input errors."""

import collections
import difflib
import functools
import hashlib
import json
import os

import helpers
import numpy as np
import pytest

from gf_jax import data
from gf_jax.data.shuffle import FeistelPermutation

# Modules whose tests live here (tests/test_architecture.py finds a module's tests by its name or here).
COVERS = (
    "gf_jax.batch",
    "gf_jax.data.config",
    "gf_jax.data.canaries",
    "gf_jax.data.eval_batches",
    "gf_jax.data.iterator",
    "gf_jax.data.packing",
    "gf_jax.data.shuffle",
    "gf_jax.data.sources",
    "gf_jax.data.splits",
    "gf_jax.data.tokens",
)

ROOT = helpers.REPO
SHAKESPEARE = os.path.join(ROOT, "data", "tinyshakespeare.txt")
WIKITEXT = os.path.join(ROOT, "data", "wikitext2_valid.txt")


@pytest.fixture(scope="module")
def small_config(tmp_path_factory, tok):
    """The first 300 speeches of Tiny Shakespeare, with the module's tokenizer."""
    return data.DataConfig(path=SHAKESPEARE, split_rule="blank_line", max_documents=300, tokenizer=tok.path)


def random_docs(seed, n=23, max_len=70):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 300, size=rng.integers(1, max_len)).astype(np.int32) for _ in range(n)]


def rows_of_epoch(it):
    """All rows of the first epoch (global_batch 1 -> one row per step)."""
    return [it.batch(s) for s in range(it.rows_per_epoch)]


def assert_same_batch(got, want):
    """Every field equal (the same fields None)."""
    for name in want._fields:
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None), name
        if w is not None:
            np.testing.assert_array_equal(g, w)


def targets_seen(batches, docs):
    """(doc, position) -> list of (target, weight) for every input token, using doc_ids/positions."""
    seen = collections.defaultdict(list)
    for b in batches:
        for r in range(b.inputs_BxT.shape[0]):
            for c in range(b.inputs_BxT.shape[1]):
                d, p = int(b.doc_ids_BxT[r, c]), int(b.positions_BxT[r, c])
                if d < 0:
                    assert b.weights_BxT[r, c] == 0 and b.segment_ids_BxT[r, c] == 0
                    continue
                assert b.inputs_BxT[r, c] == docs[d][p]  # the true position within the document
                if b.weights_BxT[r, c] > 0:
                    seen[(d, p)].append(int(b.targets_BxT[r, c]))
    return seen


# ---------------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("mode", ["packed", "document"])
def test_every_transition_is_a_weighted_target_exactly_once_per_epoch(mode):
    docs = random_docs(0)
    it = data.BatchIterator(docs, global_batch=1, seq_len=16, seed=3, process_index=0, process_count=1,
                            mode=mode, pad_id=0, prefetch=0, with_doc_ids=True)
    seen = targets_seen(rows_of_epoch(it), docs)
    expected = {(d, p): [int(t[p + 1])] for d, t in enumerate(docs) for p in range(len(t) - 1)}
    assert dict(seen) == expected


def test_unpacking_a_packed_epoch_gives_back_the_documents():
    docs = random_docs(1, n=15, max_len=50)
    it = data.BatchIterator(docs, global_batch=1, seq_len=12, seed=0, process_index=0, process_count=1,
                            shuffle=False, prefetch=0)
    # In stream order, the pieces concatenated (one-token overlaps removed) are the documents.
    pieces = [p for b in rows_of_epoch(it) for row in data.unpack_batch(b) for p in row]
    rebuilt, current = [], None
    for start, toks in pieces:
        if start == 0:
            current = list(toks)
            rebuilt.append(current)
        else:
            assert start == len(current) - 1  # continues where the previous row ended (overlap 1)
            current.extend(toks[1:])
    assert len(rebuilt) == len(docs)
    for got, want in zip(rebuilt, docs):
        np.testing.assert_array_equal(got, want)


def test_segments_positions_and_boundary_weights_of_one_packed_row():
    docs = [np.arange(10, 15, dtype=np.int32), np.arange(20, 24, dtype=np.int32), np.arange(30, 40, dtype=np.int32)]
    it = data.BatchIterator(docs, global_batch=1, seq_len=12, seed=0, process_index=0, process_count=1,
                            shuffle=False, prefetch=0)
    b = it.batch(0)
    # Row = tokens 0..12 of the stream 10..14 | 20..23 | 30..39.
    np.testing.assert_array_equal(b.inputs_BxT[0], [10, 11, 12, 13, 14, 20, 21, 22, 23, 30, 31, 32])
    np.testing.assert_array_equal(b.targets_BxT[0], [11, 12, 13, 14, 20, 21, 22, 23, 30, 31, 32, 33])
    np.testing.assert_array_equal(b.positions_BxT[0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2])
    np.testing.assert_array_equal(b.segment_ids_BxT[0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(b.weights_BxT[0], [1, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1])
    # The second row continues the last document at its true position 3 and is padded after it.
    b = it.batch(1)
    np.testing.assert_array_equal(b.positions_BxT[0][:6], [3, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(b.inputs_BxT[0][:6], [33, 34, 35, 36, 37, 38])
    # Token 39 (the document's last) is an input whose target is padding: in segment 1, weight 0.
    np.testing.assert_array_equal(b.inputs_BxT[0][6:], [39] + [0] * 5)
    np.testing.assert_array_equal(b.segment_ids_BxT[0], [1] * 7 + [0] * 5)
    np.testing.assert_array_equal(b.weights_BxT[0], [1] * 6 + [0] * 6)
    assert it.rows_per_epoch == 2 == data.rows_per_epoch([len(d) for d in docs], 12, "packed")
    assert {k: v.dtype for k, v in b._asdict().items() if v is not None} == {
        "inputs_BxT": np.int32, "targets_BxT": np.int32, "positions_BxT": np.int32,
        "segment_ids_BxT": np.int32, "weights_BxT": np.float32}


def test_document_mode_pads_each_document_and_splits_long_ones_with_true_positions():
    docs = [np.arange(100, 105, dtype=np.int32), np.arange(200, 220, dtype=np.int32)]
    it = data.BatchIterator(docs, global_batch=3, seq_len=8, seed=0, process_index=0, process_count=1,
                            mode="document", pad_id=3, shuffle=False, prefetch=0)
    b = it.batch(0)
    np.testing.assert_array_equal(b.inputs_BxT[0], [100, 101, 102, 103, 104, 3, 3, 3])
    np.testing.assert_array_equal(b.weights_BxT[0], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(b.segment_ids_BxT[0], [1, 1, 1, 1, 1, 0, 0, 0])
    # 20 tokens, 19 targets, T=8 -> rows start at positions 0, 8, 16.
    np.testing.assert_array_equal(b.positions_BxT[1], np.arange(8))
    np.testing.assert_array_equal(b.positions_BxT[2], np.arange(8, 16))
    np.testing.assert_array_equal(b.inputs_BxT[2], np.arange(208, 216))
    np.testing.assert_array_equal(b.targets_BxT[2], np.arange(209, 217))
    assert b.weights_BxT[1:].all()
    assert it.rows_per_epoch == 4 == data.rows_per_epoch([len(d) for d in docs], 8, "document")
    last = it.batch(1).positions_BxT[0]
    np.testing.assert_array_equal(last[:3], [16, 17, 18])


# --------------------------------------------------------------------------- determinism and resume


def test_batches_are_a_pure_function_of_seed_and_step():
    docs = random_docs(2, n=40)
    make = lambda seed, prefetch: data.BatchIterator(docs, global_batch=4, seq_len=16, seed=seed, process_index=0,
                                                     process_count=1, prefetch=prefetch)
    a, b, c = make(0, 2), make(0, 0), make(1, 0)
    first = [next(a) for _ in range(12)]  # prefetched on a thread
    for s, batch in enumerate(first):
        assert_same_batch(batch, next(b))  # unprefetched
        assert_same_batch(batch, a.batch(s))  # random access
    assert any(not np.array_equal(x.inputs_BxT, c.batch(s).inputs_BxT) for s, x in enumerate(first))
    a.close()


@pytest.mark.parametrize("algorithm", ["feistel", "permutation"])
def test_each_epoch_is_reshuffled_and_covers_every_row_once(algorithm):
    docs = random_docs(3, n=30)
    it = data.BatchIterator(docs, global_batch=1, seq_len=16, seed=0, process_index=0, process_count=1,
                            prefetch=0, with_doc_ids=True, shuffle_algorithm=algorithm)
    R = it.rows_per_epoch
    epoch0 = [it.batch(s) for s in range(R)]
    epoch1 = [it.batch(s) for s in range(R, 2 * R)]
    assert it.epoch_of(R - 1) == 0 and it.epoch_of(R) == 1
    order = lambda ep: [int(b.doc_ids_BxT[0, 0]) for b in ep]
    assert order(epoch0) != order(epoch1)
    expected = {(d, p): [int(t[p + 1])] for d, t in enumerate(docs) for p in range(len(t) - 1)}
    assert dict(targets_seen(epoch0, docs)) == expected
    assert dict(targets_seen(epoch1, docs)) == expected


def test_resume_yields_exactly_the_uninterrupted_batches():
    docs = random_docs(4, n=20)
    kw = dict(global_batch=4, seq_len=16, seed=7, process_index=0, process_count=1)
    straight = data.BatchIterator(docs, **kw)
    expected = [next(straight) for _ in range(40)]  # crosses several epochs
    assert straight.epoch_of(39) >= 2
    straight.close()

    first = data.BatchIterator(docs, **kw)
    for _ in range(13):
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # goes through a checkpoint as JSON
    first.close()
    assert state["step"] == 13
    resumed = data.BatchIterator(docs, **kw)
    resumed.set_state(state)
    for want in expected[13:]:
        assert_same_batch(next(resumed), want)
    resumed.close()

    other = data.BatchIterator(docs, **{**kw, "seed": 8})
    with pytest.raises(ValueError, match="different data or settings"):
        other.set_state(state)


# --------------------------------------------------------------------------------- epoch orders


def feistel_reference(n, key, i):
    """``FeistelPermutation(n, key)[i]`` in plain Python integers, written from the definition
    (unbalanced Feistel network over 2**bits, splitmix64 round function, cycle-walking); only
    the key schedule is taken from the class."""
    keys = [int(k) for k in FeistelPermutation(n, key).keys]
    bits, m64 = max(1, (n - 1).bit_length()), (1 << 64) - 1

    def mix(x):
        x ^= x >> 30
        x = x * 0xBF58476D1CE4E5B9 & m64
        x ^= x >> 27
        x = x * 0x94D049BB133111EB & m64
        return x ^ (x >> 31)

    def encrypt(x):
        wl, wr = (bits + 1) // 2, bits // 2
        left, right = x >> wr, x & ((1 << wr) - 1)
        for k in keys:
            left, right = right, left ^ (mix(right ^ k) & ((1 << wl) - 1))
            wl, wr = wr, wl
        return (left << wr) | right

    x = encrypt(i)
    while x >= n:
        x = encrypt(x)
    return x


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 65, 1000])
def test_feistel_order_is_a_bijection_equal_to_its_plain_python_definition(n):
    perm = FeistelPermutation(n, (3, 1, 0, 2))
    whole = perm[0:n]
    np.testing.assert_array_equal(np.sort(whole), np.arange(n))  # a bijection of [0, n)
    assert whole.tolist() == [feistel_reference(n, (3, 1, 0, 2), i) for i in range(n)]
    picks = np.array([n - 1, 0, n // 2], np.int64)
    np.testing.assert_array_equal(perm[picks], whole[picks])  # any index, any order, no state
    assert [perm[int(i)] for i in picks] == whole[picks].tolist()
    np.testing.assert_array_equal(FeistelPermutation(n, (3, 1, 0, 2))[0:n], whole)  # a pure function of the key
    if n >= 64:
        assert not np.array_equal(FeistelPermutation(n, (3, 1, 1, 2))[0:n], whole)  # another epoch, another order


def test_feistel_order_of_a_large_range_is_a_shuffle():
    n = 300_007
    perm = FeistelPermutation(n, (0, 0, 0, 2))
    whole = np.concatenate([perm[a:min(a + 65_536, n)] for a in range(0, n, 65_536)])
    assert np.array_equal(np.bincount(whole, minlength=n), np.ones(n, np.int64))
    assert abs(np.corrcoef(np.arange(n), whole)[0, 1]) < 0.01  # no trace of the input order
    assert np.mean(whole == np.arange(n)) < 1e-3
    assert np.std(np.diff(whole)) > n / 3  # neighbours land far apart (independent uniforms: n / sqrt(6))


# Batches of random_docs(11, n=30) (process 1 of 2, batch 4, T=16, seed 5, context 4) over three
# epochs, as computed by gf_jax before data.shuffle_algorithm existed: sha256 of every field.
LEGACY_BATCHES = {"packed": "258a38a43e185184", "document": "75dbc777172447c0"}


def batches_digest(it, steps):
    h = hashlib.sha256()
    for s in steps:
        for v in it.batch(s):
            h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("mode", ["packed", "document"])
def test_runs_saved_before_shuffle_algorithm_resume_with_their_own_batches(mode):
    docs = random_docs(11, n=30)
    kw = dict(global_batch=4, seq_len=16, seed=5, process_index=1, process_count=2, prefetch=0, mode=mode,
              context=4, with_doc_ids=True)
    legacy = data.BatchIterator(docs, shuffle_algorithm="permutation", **kw)
    epochs = range(3 * legacy.rows_per_epoch // legacy.local_batch)
    assert batches_digest(legacy, epochs) == LEGACY_BATCHES[mode]
    # A checkpoint written before the key existed holds the step and fingerprint only.
    old_state = {"step": 5, "fingerprint": legacy.fingerprint}
    resumed = data.BatchIterator(docs, **kw)  # shuffle_algorithm: auto
    assert resumed.get_state()["shuffle_algorithm"] == "feistel"
    resumed.set_state(old_state)
    assert resumed.get_state()["shuffle_algorithm"] == "permutation"
    assert batches_digest(resumed, epochs) == LEGACY_BATCHES[mode]
    with pytest.raises(ValueError, match="resume with data.shuffle_algorithm=permutation"):
        data.BatchIterator(docs, shuffle_algorithm="feistel", **kw).set_state(old_state)
    # A new run's state names its algorithm; auto resumes it, the other explicit one is refused.
    new = data.BatchIterator(docs, **kw)
    state = json.loads(json.dumps({**new.get_state(), "step": 5}))
    assert batches_digest(new, epochs) != LEGACY_BATCHES[mode]
    again = data.BatchIterator(docs, **kw)
    again.set_state(state)
    assert batches_digest(again, epochs) == batches_digest(new, epochs)
    with pytest.raises(ValueError, match="resume with data.shuffle_algorithm=feistel"):
        data.BatchIterator(docs, shuffle_algorithm="permutation", **kw).set_state(state)


# ------------------------------------------------------------------------------------ multi-host


def test_each_process_reads_a_disjoint_share_and_together_all(small_config, tok):
    config = data.DataConfig(**{**small_config.__dict__, "validation_fraction": 0.2})
    train_ids = {d.id for d in data.load_documents(config, "train")}
    shares = []
    for pi in range(3):
        it = data.make_train_iterator(config, tok, global_batch=6, seq_len=32, process_index=pi, process_count=3,
                                      prefetch=0, with_doc_ids=True)
        assert it.local_batch == 2 and next(it).inputs_BxT.shape == (2, 32)
        ids = [d.id for d in it.documents]
        shares.append(set(ids))
        assert len(ids) == len(set(ids))
        # Batches of a process only ever hold its own documents.
        seen = {int(d) for s in range(5) for d in it.batch(s).doc_ids_BxT.ravel() if d >= 0}
        assert seen <= set(range(len(ids)))
    assert sum(len(s) for s in shares) == len(set().union(*shares))
    assert set().union(*shares) == train_ids


def test_process_share_is_disjoint_and_complete():
    for n in (0, 1, 7, 100):
        for count in (1, 3, 8):
            shares = [list(data.process_share(n, i, count)) for i in range(count)]
            assert sorted(sum(shares, [])) == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_eval_pass_counts_every_target_once_over_processes():
    docs = random_docs(5, n=37)
    per_process = [list(data.eval_batches(docs, global_batch=4, seq_len=16, process_index=pi, process_count=2,
                                          with_doc_ids=True)) for pi in range(2)]
    assert len(per_process[0]) == len(per_process[1]) > 0
    seen = collections.defaultdict(list)
    for batches in per_process:
        for k, v in targets_seen(batches, docs).items():
            seen[k] += v
    assert dict(seen) == {(d, p): [int(t[p + 1])] for d, t in enumerate(docs) for p in range(len(t) - 1)}
    total = sum(b.weights_BxT.sum() for bs in per_process for b in bs)
    assert total == sum(len(t) - 1 for t in docs)


def test_to_global_batch_assembles_on_the_mesh():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    docs = random_docs(6)
    local = data.BatchIterator(docs, global_batch=8, seq_len=16, process_index=0, process_count=1,
                               prefetch=0, with_doc_ids=True, context=4).batch(0)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    glob = data.to_global_batch(local, sharding)
    assert glob.doc_ids_BxT is None  # host-only: document ids never go to the devices
    for k, v in local.for_device()._asdict().items():
        if v is None:
            assert getattr(glob, k) is None
            continue
        assert getattr(glob, k).shape == v.shape and getattr(glob, k).sharding == sharding
        np.testing.assert_array_equal(np.asarray(getattr(glob, k)), v)
    assert glob.context_BxC.shape == (8, 4)


# ---------------------------------------------------------------------------------------- sources


def test_wikitext_articles_on_a_slice_of_the_real_file(tmp_path):
    with open(WIKITEXT, encoding="utf-8-sig") as fh:
        lines = fh.read().split("\n")[:400]
    text = "\n".join(lines)
    docs = data.split_wikitext(text)
    titles = [line for line in lines if line.startswith(" = ") and not line.startswith(" = = ") and line.endswith(" = ")]
    assert len(titles) >= 2 and len(docs) == len(titles)
    for doc, title in zip(docs, titles):
        assert doc.split("\n")[0].strip() == title.strip()
        assert " = = " not in doc.split("\n")[0]
    assert sum(" = = " in d for d in docs) > 0  # section headings stay inside their article
    # Nothing is lost: every non-blank line is in exactly one article.
    assert sorted(line.strip() for d in docs for line in d.split("\n") if line.strip()) == sorted(
        line.strip() for line in lines if line.strip())
    # The whole embedded file has its 60 articles.
    whole = data.read_text_documents(WIKITEXT, "wikitext")
    assert len(whole) == 60 and whole[0].id == "wikitext2_valid.txt#0"
    assert whole[0].text.startswith("= Homarus gammarus =")


def test_text_sources_blank_lines_and_folders(tmp_path):
    assert data.split_blank_lines("a\nb\n\n\nc\n \n d\n") == ["a\nb", "c", " d"]
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee\n\nbuzz", encoding="utf-8")
    (folder / "sub" / "a.txt").write_text("ant", encoding="utf-8")
    (folder / "skip.md").write_text("not text", encoding="utf-8")
    docs = data.read_text_documents(str(folder), "file")
    assert [(d.id, d.text) for d in docs] == [("b.txt", "bee\n\nbuzz"), ("sub/a.txt", "ant")]
    docs = data.read_text_documents(str(folder), "blank_line")
    assert [d.id for d in docs] == ["b.txt#0", "b.txt#1", "sub/a.txt#0"]
    shakespeare = data.load_documents(data.DataConfig(path=SHAKESPEARE))
    assert len(shakespeare) > 7000 and shakespeare[0].text == "First Citizen:\nBefore we proceed any further, hear me speak."


def test_jsonl_source_ids_and_line_errors(tmp_path):
    good = tmp_path / "docs.jsonl"
    good.write_text('{"id": "x1", "body": "one"}\n\n{"id": 2, "body": "two"}\n', encoding="utf-8")
    docs = data.load_documents(data.DataConfig(source="jsonl", path=str(good), text_field="body", id_field="id"))
    assert [(d.id, d.text) for d in docs] == [("x1", "one"), ("2", "two")]
    docs = data.load_documents(data.DataConfig(source="jsonl", path=str(good), text_field="body"))
    assert [d.id for d in docs] == ["docs.jsonl:1", "docs.jsonl:3"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "ok"}\n{"body": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        data.load_documents(data.DataConfig(source="jsonl", path=str(bad), text_field="body"))
    with pytest.raises(ValueError, match=r"docs\.jsonl:1: no string field 'text'"):
        data.load_documents(data.DataConfig(source="jsonl", path=str(good)))


def test_bad_input_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_documents(data.DataConfig(path=str(tmp_path / "missing.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="no documents found"):
        data.load_documents(data.DataConfig(path=str(empty)))
    with pytest.raises(ValueError, match="data.mode"):
        data.DataConfig(mode="bogus")
    with pytest.raises(ValueError, match="model.vocab_size"):
        data.check_vocab_fits(tok, 256)
    data.check_vocab_fits(tok, tok.vocab_size)
    tokens = [np.zeros(80, np.int32), np.zeros(30, np.int32)]
    with pytest.raises(ValueError, match="1 of 2 documents are shorter than the 64 tokens.*'b'"):
        data.check_documents_long_enough(tokens, 64, ids=["a", "b"])


# -------------------------------------------------------------------------- splits and canaries


def test_validation_split_is_stable_disjoint_and_complete(small_config):
    config = data.DataConfig(**{**small_config.__dict__, "validation_fraction": 0.25})
    train, val = data.load_documents(config, "train"), data.load_documents(config, "validation")
    all_ids = [d.id for d in data.load_documents(config)]
    assert sorted(d.id for d in train + val) == sorted(all_ids)
    assert 0.15 < len(val) / len(all_ids) < 0.35
    reseeded = data.DataConfig(**{**config.__dict__, "seed": 5})
    assert [d.id for d in data.load_documents(reseeded, "validation")] == [d.id for d in val]


def test_canaries_are_injected_n_times_at_recorded_places(small_config, tok):
    config = data.DataConfig(**{**small_config.__dict__, "canary_path": WIKITEXT, "canary_count": 4,
                                "canary_repeats": 5, "canary_seed": 1, "validation_fraction": 0.5})
    injected, held_out = data.load_canaries(config)
    assert len(injected) == 4 and len(held_out) == 56
    assert all(d.id.startswith("canary/wikitext2_valid.txt#") for d in injected + held_out)
    stream = data.document_stream(config)
    assert len(stream) == 300 + 4 * 5
    assert set(stream.canary_record) == {d.id for d in injected}
    for cid, places in stream.canary_record.items():
        assert len(places) == 5 and all(stream[i].id == cid for i in places)
    ids = [stream[i].id for i in range(len(stream))]
    assert collections.Counter(i for i in ids if i.startswith("canary/")) == {d.id: 5 for d in injected}
    # The background keeps its order around the canaries; places are spread, not bunched.
    assert [i for i in ids if not i.startswith("canary/")] == [d.id for d in data.read_background(config)]
    assert np.std(sorted(p for ps in stream.canary_record.values() for p in ps)) > 50
    # Canaries are always training documents, held-out canaries never are.
    train_ids = {d.id for d in data.load_documents(config, "train")}
    assert {d.id for d in injected} <= train_ids and not {d.id for d in held_out} & train_ids
    it = data.make_train_iterator(config, tok, global_batch=2, seq_len=64, process_index=0, process_count=1,
                                  prefetch=0)
    assert collections.Counter(d.id for d in it.documents if d.id.startswith("canary/")) == {d.id: 5 for d in injected}
    # Same seed, same places; another seed, other places.
    assert data.document_stream(config).canary_record == stream.canary_record
    moved = data.document_stream(data.DataConfig(**{**config.__dict__, "canary_seed": 2}))
    assert moved.canary_record != stream.canary_record


def test_perturbed_canary_copies_are_near_duplicates_at_the_asked_rate(small_config):
    config = data.DataConfig(**{**small_config.__dict__, "canary_path": WIKITEXT, "canary_count": 4,
                                "canary_repeats": 6, "canary_seed": 1, "canary_perturb_rate": 10.0})
    injected, _ = data.load_canaries(config)
    stream = data.document_stream(config)
    originals = {d.id: d.text for d in injected}
    edits = []
    for cid, places in stream.canary_record.items():
        copies = [stream[i].text for i in places]
        assert len(set(copies)) == len(copies) and originals[cid] not in copies  # every copy its own variant
        assert [d.text for d in stream.get_many(places)] == copies  # both access paths agree
        for text in copies:
            words, changed = originals[cid].split(), text.split()
            matcher = difflib.SequenceMatcher(a=words, b=changed, autojunk=False)
            edits.append((len(words) - sum(b.size for b in matcher.get_matching_blocks())) / len(words))
    assert 0.05 < np.mean(edits) < 0.15  # about 10 edits per 100 words
    assert data.document_stream(config)[stream.canary_record[injected[0].id][0]].text == \
        stream[stream.canary_record[injected[0].id][0]].text  # seeded: the same copies every run
    exact = data.document_stream(data.DataConfig(**{**config.__dict__, "canary_perturb_rate": 0.0}))
    assert all(exact[i].text == originals[cid] for cid, places in exact.canary_record.items() for i in places)
    rng = np.random.default_rng(0)
    noisy = data.canaries.perturb("The Quick brown fox", 100.0, rng, ["x"], noise=True)
    assert noisy != "The Quick brown fox" and noisy.lower().split().count("x") >= 1


def test_train_iterator_on_text_uses_bos_eos_and_the_tokenizer(small_config, tok):
    it = data.make_train_iterator(small_config, tok, global_batch=4, seq_len=64, process_index=0,
                                  process_count=1, prefetch=0, with_doc_ids=True)
    b = it.batch(0)
    starts = (b.positions_BxT == 0) & (b.segment_ids_BxT > 0)
    assert (b.inputs_BxT[starts] == tok.bos_id).all()
    ends = (b.weights_BxT == 0) & (b.segment_ids_BxT > 0) & (b.targets_BxT == tok.bos_id)
    assert (b.inputs_BxT[ends] == tok.eos_id).all()
    d = int(b.doc_ids_BxT[0, 0])
    assert tok.decode([data.tokenize_documents([it.documents[d]], tok)[0][1:-1].tolist()]) == [it.documents[d].text]


# ------------------------------------------------------------------------------------------- TFDS


@functools.cache
def _tiny_builder_class():
    """A 40 + 6 document text dataset (defined once: TFDS registers builder names globally)."""
    import tensorflow_datasets as tfds

    class GfTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "title": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(40), "validation": self._generate_examples(6, "v")}

        def _generate_examples(self, n, tag=""):
            for i in range(n):
                yield f"{tag}{i}", {"text": f"Document {tag}{i}: " + "to be or not to be. " * (i % 5 + 1),
                                    "title": f"doc-{tag}{i}"}

    # TFDS looks a builder's module up as a package resource when its dotted name has two parts or
    # more (pytest's importlib mode names this one tests.data.test_pipeline); a one-part name skips it.
    GfTinyText.__module__ = "gf_tiny_text_builder"
    return GfTinyText


def _tiny_tfds(data_dir):
    """Builds the dataset in ArrayRecord format under ``data_dir`` (no network, no TensorFlow)."""
    _tiny_builder_class()(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return "gf_tiny_text"


def test_tfds_source_reads_arrayrecord_with_slicing_and_per_host_shares(tmp_path, tok):
    name = _tiny_tfds(str(tmp_path))
    config = data.DataConfig(source="tfds", tfds_name=name, tfds_split="train[:50%]", tfds_data_dir=str(tmp_path),
                             tokenizer=tok.path)
    docs = data.load_documents(config)
    assert len(docs) == 20 and len({d.text for d in docs}) == 20
    assert all(d.text.startswith("Document ") for d in docs) and docs[3].id == f"{name}/train[:50%]#3"
    titled = data.load_documents(data.DataConfig(**{**config.__dict__, "id_field": "title", "tfds_split": "validation"}))
    assert sorted(d.id for d in titled) == sorted(f"doc-v{i}" for i in range(6))
    shares = [data.make_train_iterator(config, tok, global_batch=4, seq_len=32, process_index=pi, process_count=2,
                                       prefetch=0).documents for pi in range(2)]
    assert sorted(d.id for s in shares for d in s) == sorted(d.id for d in docs)
    assert not {d.id for d in shares[0]} & {d.id for d in shares[1]}
    with pytest.raises(FileNotFoundError, match="could not be opened"):
        data.load_documents(data.DataConfig(source="tfds", tfds_name="no_such_dataset", tfds_data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="no feature 'body'"):
        data.load_documents(data.DataConfig(**{**config.__dict__, "tfds_text_feature": "body"}))


def test_iterator_setting_errors(small_config, tok):
    docs = random_docs(7)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        data.BatchIterator(docs, global_batch=4, seq_len=8, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="no document with at least 2 tokens"):
        data.BatchIterator([np.array([5], np.int32)], global_batch=1, seq_len=8, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="needs data.canary_path"):
        data.DataConfig(canary_repeats=3)
    tiny = data.DataConfig(**{**small_config.__dict__, "max_documents": 2})
    with pytest.raises(ValueError, match="process 0 of 4 got no train documents"):
        data.make_train_iterator(tiny, tok, global_batch=4, seq_len=8, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="validation_fraction > 0"):
        data.make_train_iterator(small_config, tok, global_batch=4, seq_len=8, split="validation")


def test_row_context_holds_the_targets_before_each_row():
    docs = [np.arange(100, 120, dtype=np.int32), np.arange(200, 215, dtype=np.int32)]
    rows = [[(0, 5, 12), (1, 0, 3)], [(1, 0, 9)], [(0, 2, 10)]]
    batch = data.assemble_rows(docs, rows, seq_len=10, pad_id=-7, context=4)
    ctx = batch.context_BxC
    # Row 0 starts at token 5 of doc 0: column 0's target is token 6; the targets before it are
    # tokens 1..5, of which the last 4 fit.
    assert ctx[0].tolist() == [102, 103, 104, 105]
    assert ctx[1].tolist() == [-7, -7, -7, -7]  # starts a document: no context
    assert ctx[2].tolist() == [-7, -7, 101, 102]  # only tokens 1..2 precede
    assert data.assemble_rows(docs, rows, seq_len=10, pad_id=0).context_BxC is None


@pytest.mark.parametrize("mode", ["packed", "document"])
def test_packed_rows_with_context_get_the_full_document_goldfish_mask(mode):
    # The end-to-end property: with row context >= h, every target's fate in any row equals the
    # mask of its whole document, so the drop rate stays 1/k however rows cut documents.
    import jax

    from gf_jax import GoldfishConfig, goldfish_mask

    rng = np.random.default_rng(3)
    docs = [rng.integers(4, 5000, size=int(n), dtype=np.int32) for n in rng.integers(20, 300, size=40)]
    cfg = GoldfishConfig(k=4, h=13)
    # Each document's own mask, all in one call (one compile): a target's fate depends only on the
    # tokens before it, so zeros padded after a document change nothing in it.
    padded = np.zeros((len(docs), 300), np.int32)
    for i, d in enumerate(docs):
        padded[i, :len(d) - 1] = d[1:]
    whole = np.asarray(goldfish_mask(padded, cfg))
    full = {i: whole[i, :len(d) - 1] for i, d in enumerate(docs)}
    it = data.BatchIterator(docs, global_batch=8, seq_len=64, seed=1, mode=mode, pad_id=0, prefetch=0,
                            with_doc_ids=True, context=16)
    mask = jax.jit(lambda t, p, c: goldfish_mask(t, cfg, positions_BxT=p, context_BxC=c))
    n_checked = n_mid = 0
    for step in range(it.rows_per_epoch // 8):
        b = it.batch(step)
        drop = np.asarray(mask(b.targets_BxT, b.positions_BxT, b.context_BxC))
        valid = b.weights_BxT > 0
        for r, c in zip(*np.nonzero(valid)):
            assert drop[r, c] == full[b.doc_ids_BxT[r, c]][b.positions_BxT[r, c]]
            n_checked += 1
        n_mid += int((b.positions_BxT[:, 0] > 0).sum())
    assert n_checked > 3000 and n_mid > 10


@pytest.mark.parametrize("mode", ["packed", "document"])
def test_training_and_validation_batches_give_each_target_the_same_goldfish_fate(mode):
    # The loss over kept targets on validation batches must apply the mask training applies: with
    # the same row context, every (document, position) target is dropped in both or in neither.
    import jax

    from gf_jax import GoldfishConfig, goldfish_mask

    rng = np.random.default_rng(11)
    docs = [rng.integers(4, 5000, size=int(n), dtype=np.int32) for n in rng.integers(20, 200, size=30)]
    cfg = GoldfishConfig(k=4, h=13)
    mask = jax.jit(lambda t, p, c: goldfish_mask(t, cfg, positions_BxT=p, context_BxC=c))

    def fates(batches):
        """(document, position) -> dropped, for every real target of the batches."""
        out = {}
        for b in batches:
            drop_BxT = np.asarray(mask(b.targets_BxT, b.positions_BxT, b.context_BxC))
            for r, c in zip(*np.nonzero(b.weights_BxT > 0)):
                out[(int(b.doc_ids_BxT[r, c]), int(b.positions_BxT[r, c]))] = bool(drop_BxT[r, c])
        return out

    train = data.BatchIterator(docs, global_batch=4, seq_len=48, seed=2, mode=mode, prefetch=0, with_doc_ids=True,
                               context=16)
    trained = fates(train.batch(s) for s in range(-(-train.rows_per_epoch // 4)))
    validated = fates(data.eval_batches(docs, global_batch=4, seq_len=48, mode=mode, context=16, with_doc_ids=True))
    assert len(validated) == sum(len(d) - 1 for d in docs)
    assert trained == validated
    # Without the context, rows that start mid-document hash other windows: the fates differ.
    blind = fates(data.eval_batches(docs, global_batch=4, seq_len=48, mode=mode, with_doc_ids=True))
    assert blind != validated
